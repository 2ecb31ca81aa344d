"""Acceptance statistics: mean tokens gained per verification step.

One Jacobi step gains ``j + 1`` exact tokens (``j`` accepted guesses plus the target's
own token). Both sources here are vLLM's own counters:

* per request: ``CompletionOutput.spec_decode_metrics`` (enable it with
  ``LLM(..., per_request_spec_decode_metrics="summary")``);
* per engine: the ``vllm:spec_decode_*`` counters behind ``LLM.get_metrics()`` and the
  server's ``/metrics`` (needs stats logging on, i.e. ``disable_log_stats=False``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Acceptance:
    steps: int
    """Verification steps that carried a draft."""
    accepted: int
    """Draft tokens accepted over those steps."""
    drafted: int
    """Draft tokens proposed over those steps."""
    decode_tokens: int = 0
    """Output tokens after the first (which the prompt's own step makes); 0: not known."""
    decode_steps: int = 0
    """Steps that made them, those that carried no draft included."""

    @property
    def tokens_per_step(self) -> float:
        """Mean exact tokens gained per engine step.

        With the per-request record (:func:`request_acceptance`): decode tokens over decode
        steps, counting the steps in which adaptive drafting sent no guess. Without it (the
        engine's counters): ``1 + accepted / steps`` over the steps that carried a draft.
        The two agree for a fixed block.
        """
        if self.decode_steps:
            return self.decode_tokens / self.decode_steps
        return 1.0 + self.accepted / self.steps if self.steps else 1.0

    def __add__(self, other: Acceptance) -> Acceptance:
        return Acceptance(
            self.steps + other.steps,
            self.accepted + other.accepted,
            self.drafted + other.drafted,
            self.decode_tokens + other.decode_tokens,
            self.decode_steps + other.decode_steps,
        )


def request_acceptance(output: Any) -> Acceptance:
    """Acceptance of one ``RequestOutput`` (or ``CompletionOutput``) from vLLM."""
    completion = output.outputs[0] if hasattr(output, "outputs") else output
    metrics = completion.spec_decode_metrics
    if metrics is None:
        raise ValueError(
            "no per-request speculative metrics on this output: create the engine with "
            "per_request_spec_decode_metrics='summary' (and a speculative_config)"
        )
    steps = sum(metrics.histogram)
    accepted = sum(j * c for j, c in enumerate(metrics.histogram))
    decode_tokens = max(len(completion.token_ids) - 1, 0)
    # Steps without a draft made one token each; the last step may have made more than
    # the output kept (cut at a stop), so its excess says nothing about undrafted steps.
    undrafted = max(decode_tokens - steps - accepted, 0)
    return Acceptance(steps, accepted, metrics.num_draft_tokens, decode_tokens,
                      steps + undrafted)


def batch_acceptance(outputs: Iterable[Any]) -> Acceptance:
    """Acceptance pooled over many requests (weighted by steps, not a mean of means)."""
    total = Acceptance(0, 0, 0)
    for out in outputs:
        total = total + request_acceptance(out)
    return total


def engine_acceptance(llm: Any) -> Acceptance:
    """Acceptance since the engine started, from vLLM's ``vllm:spec_decode_*`` counters."""
    values = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    return Acceptance(
        int(values.get("vllm:spec_decode_num_drafts") or 0),
        int(values.get("vllm:spec_decode_num_accepted_tokens") or 0),
        int(values.get("vllm:spec_decode_num_draft_tokens") or 0),
    )
