"""The user's Jacobi options: validated here, before any engine starts.

Users write ``speculative_config={"method": "jacobi", "num_speculative_tokens": 16}``
(or ``--jacobi --jacobi-block-size 16``). vLLM 0.32 knows no ``"jacobi"`` method, so
:func:`to_vllm_speculative_config` rewrites the dict into vLLM's ``custom_class`` method
pointing at :class:`cllm_vllm.proposer.JacobiProposer`; the Jacobi-only options ride
along on the resulting ``SpeculativeConfig`` as the attribute ``jacobi_options``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cllm_vllm.fill import DEFAULT_FILL, FILL_POLICIES

METHOD = "jacobi"
PROPOSER_CLASS = "cllm_vllm.proposer.JacobiProposer"
DEFAULT_BLOCK_SIZE = 16
OPTIONS_ATTR = "jacobi_options"

# vLLM's own keys that keep their meaning with Jacobi drafting.
PASSTHROUGH_KEYS = {
    # [(first batch size, last batch size, k), ...]: an upper bound on the block per batch
    # size (vLLM hands the per-batch k to its built-in drafters only; the Jacobi proposer
    # reads the schedule itself).
    "num_speculative_tokens_per_batch_size",
}
_JACOBI_KEYS = {"method", "num_speculative_tokens", "fill", "adaptive"}


@dataclass(frozen=True)
class JacobiOptions:
    fill: str = DEFAULT_FILL
    adaptive: bool = True
    """Choose each request's draft length (0..k) per step from its acceptance and the
    measured step cost (:mod:`cllm_vllm.adaptive`); False drafts all k every step."""

    @classmethod
    def from_speculative_config(cls, spec: Any) -> JacobiOptions:
        return cls(**(getattr(spec, OPTIONS_ATTR, None) or {}))


def is_jacobi(spec_dict: dict[str, Any] | None) -> bool:
    return bool(spec_dict) and spec_dict.get("method") == METHOD


def to_vllm_speculative_config(
    spec_dict: dict[str, Any],
    max_model_len: int | None,
    async_scheduling: bool | None = None,
    v2_model_runner: bool | None = None,
    executor_backend: Any = None,
    cpu_platform: bool = False,
) -> tuple[dict[str, Any], JacobiOptions]:
    """Validate a Jacobi speculative config and translate it for vLLM.

    Returns the dict vLLM's ``SpeculativeConfig`` accepts and the Jacobi options. Raises
    ``ValueError`` naming the offending option.
    """
    spec = {k.replace("-", "_"): v for k, v in spec_dict.items()}
    unknown = sorted(set(spec) - _JACOBI_KEYS - PASSTHROUGH_KEYS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} in speculative_config for method 'jacobi'; "
            f"allowed: {sorted(_JACOBI_KEYS | PASSTHROUGH_KEYS)}"
        )
    k = spec.get("num_speculative_tokens", DEFAULT_BLOCK_SIZE)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(
            f"Jacobi block size (num_speculative_tokens) must be an integer >= 1, got {k!r}"
        )
    if max_model_len is not None and k >= max_model_len:
        raise ValueError(
            f"Jacobi block size (num_speculative_tokens={k}) must be smaller than "
            f"max_model_len={max_model_len}"
        )
    fill = spec.get("fill", DEFAULT_FILL)
    if fill not in FILL_POLICIES:
        raise ValueError(f"unknown Jacobi fill policy {fill!r}; choose one of {FILL_POLICIES}")
    adaptive = spec.get("adaptive", True)
    if not isinstance(adaptive, bool):
        raise ValueError(f"Jacobi option 'adaptive' must be true or false, got {adaptive!r}")
    if v2_model_runner:
        raise ValueError(
            "Jacobi decoding needs vLLM's V1 model runner: vLLM 0.32's V2 runner does not "
            "run custom drafters (it raises NotImplementedError for method "
            "'custom_class'), and VLLM_USE_V2_MODEL_RUNNER=1 asks for it. Unset "
            "VLLM_USE_V2_MODEL_RUNNER (vLLM then picks V1 for custom drafters)."
        )
    if cpu_platform and _is_ray(executor_backend):
        raise ValueError(
            "Jacobi decoding on CPU cannot use distributed_executor_backend='ray': vLLM "
            "0.32's Ray executor does not support the CPU platform (it fails once Ray has "
            "started). On CPU, use the multiprocessing executor for tensor parallelism on "
            "one machine (--distributed-executor-backend mp --tensor-parallel-size N, with "
            "VLLM_CPU_OMP_THREADS_BIND set), and Ray for replicas (`cllm-vllm generate "
            "--ray`); the Ray executor is for GPU clusters."
        )
    if async_scheduling:
        raise ValueError(
            "Jacobi decoding cannot run with async_scheduling=True: vLLM 0.32 overlaps "
            "scheduling only for model-based drafters (EAGLE/MTP/draft model/ngram_gpu), "
            "and the Jacobi drafter needs this step's verification before it proposes. "
            "Leave async_scheduling unset (vLLM then turns it off) or set it to False."
        )
    vllm_spec = {
        "method": "custom_class",
        "model": PROPOSER_CLASS,
        "num_speculative_tokens": k,
        **{key: spec[key] for key in PASSTHROUGH_KEYS if key in spec},
    }
    return vllm_spec, JacobiOptions(fill=fill, adaptive=adaptive)


def _is_ray(backend: Any) -> bool:
    """vLLM takes the backend as a name or as an executor class."""
    if isinstance(backend, str):
        return backend == "ray"
    return backend is not None and "Ray" in getattr(backend, "__name__", "")


def attach_options(spec_config: Any, options: JacobiOptions) -> None:
    """Carry the Jacobi options on vLLM's SpeculativeConfig (it is pickled to workers)."""
    object.__setattr__(spec_config, OPTIONS_ATTR, asdict(options))

