"""The rolling-block Jacobi proposer: one more speculative-decoding proposer for vLLM v1.

vLLM verifies ``[last, g0 .. g(k-1)]`` for every running request in one forward pass and
accepts the longest prefix that matches the target (exactly, or through its rejection
sampler for sampled requests). What a Jacobi drafter needs beyond vLLM's
``custom_class`` interface is the target's argmax at *every* verified position,
rejected ones included: :mod:`cllm_vllm.vllm_hooks` hands them over through
:meth:`JacobiProposer.observe_verification` just before vLLM samples.

The proposer keeps no per-request state: the next guess of a request is a pure function
of its exact tokens and of this step's verification (:func:`cllm_vllm.jacobi.split_verified`
gives the unaccepted tail; :func:`cllm_vllm.fill.fill_guess` tops it up). Preemption,
recompute, aborts and reordering of vLLM's input batch therefore need no bookkeeping here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cllm_vllm.config import JacobiOptions
from cllm_vllm.fill import fill_guess
from cllm_vllm.jacobi import split_verified


class JacobiProposer:
    """Drafts ``k`` tokens per request: the Jacobi-updated tail, topped up by a fill policy."""

    def __init__(self, vllm_config: Any) -> None:
        from cllm_vllm.vllm_hooks import install_runner_hook

        install_runner_hook()
        spec = vllm_config.speculative_config
        self.k: int = spec.num_speculative_tokens
        self.options = JacobiOptions.from_speculative_config(spec)
        self.max_model_len: int = vllm_config.model_config.max_model_len
        # Filled by observe_verification() for the step being sampled, consumed by propose().
        self._argmax: torch.Tensor | None = None
        # Row i of the batch owns logits rows [_row_offsets[i], _row_offsets[i + 1]).
        self._row_offsets: np.ndarray | None = None
        self._num_prompt_tokens: np.ndarray | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model: the target verifies its own guesses (vLLM's CPU runner calls this)."""

    def observe_verification(
        self,
        logits: torch.Tensor,
        num_draft_tokens: list[int] | None,
        num_prompt_tokens: np.ndarray,
    ) -> None:
        """Record the target's greedy token at every row vLLM is about to sample.

        With drafts, ``logits`` has ``num_draft_tokens[i] + 1`` rows for request ``i`` of
        the input batch, in batch order (vLLM's ``SpecDecodeMetadata`` layout).
        """
        self._num_prompt_tokens = num_prompt_tokens
        if num_draft_tokens is None:
            self._argmax = self._row_offsets = None
            return
        # The argmax is taken before vLLM's sampler rescales or masks the logits in place;
        # neither temperature nor top-k/top-p moves the argmax, so this is the greedy target.
        self._argmax = logits.argmax(dim=-1)
        self._row_offsets = np.concatenate(
            [[0], np.cumsum(np.asarray(num_draft_tokens) + 1)]
        )

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Return the next guess block for every request of the input batch, in batch order."""
        argmax = None if self._argmax is None else self._argmax.cpu().numpy()
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:
                # Still prefilling (a chunk), or its output was discarded: no draft.
                drafts.append([])
                continue
            n_tok = int(num_tokens_no_spec[i])
            # Leave room for the bonus token: vLLM would trim a draft past max_model_len.
            k = min(self.k, self.max_model_len - n_tok - 1)
            if k < 1:
                drafts.append([])
                continue
            tail = np.empty(0, dtype=np.int64)
            if argmax is not None:
                # One row per draft token plus the bonus row; a single row means no draft.
                target = argmax[self._row_offsets[i] : self._row_offsets[i + 1]]
                tail = split_verified(target, len(sampled) - 1).tail
            guess = fill_guess(
                token_ids_cpu[i, :n_tok],
                tail,
                k,
                policy=self.options.fill,
                num_prompt_tokens=int(self._num_prompt_tokens[i])
                if self._num_prompt_tokens is not None
                else None,
            )
            drafts.append(guess.tolist())
        self._argmax = None
        return drafts
