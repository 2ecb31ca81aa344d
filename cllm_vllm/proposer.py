"""The rolling-block Jacobi proposer: one more speculative-decoding proposer for vLLM v1.

vLLM verifies ``[last, g0 .. g(d-1)]`` for every running request in one forward pass and
accepts the longest prefix that matches the target (exactly, or through its rejection
sampler for sampled requests). What a Jacobi drafter needs beyond vLLM's
``custom_class`` interface is the target's argmax at *every* verified position,
rejected ones included: :mod:`cllm_vllm.vllm_hooks` hands them over through
:meth:`JacobiProposer.observe_verification` just before vLLM samples.

The guess of a request is a pure function of its exact tokens and of this step's
verification (the unaccepted tail, topped up by :func:`cllm_vllm.fill.fill_guesses`), so
preemption, recompute, aborts and reordering of vLLM's input batch need no bookkeeping
for correctness. How *many* of its guesses a request sends (``0..k``) is chosen per step
by :mod:`cllm_vllm.adaptive` from acceptance statistics kept per request id and the
measured cost of engine steps; a request that leaves the batch is forgotten.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cllm_vllm.adaptive import (
    COPY,
    TAIL,
    AcceptanceTracker,
    StepCostModel,
    plan_draft_lengths,
    verified_prefix,
)
from cllm_vllm.config import JacobiOptions
from cllm_vllm.fill import fill_guesses, warm_up


class JacobiProposer:
    """Drafts up to ``k`` tokens per request: the Jacobi-updated tail, topped up by a fill
    policy, cut to the length the adaptive policy picks (or all ``k`` with a fixed block)."""

    def __init__(self, vllm_config: Any) -> None:
        from cllm_vllm.vllm_hooks import install_runner_hook, per_batch_k_schedule

        install_runner_hook()
        spec = vllm_config.speculative_config
        self.k: int = spec.num_speculative_tokens
        self.options = JacobiOptions.from_speculative_config(spec)
        self.max_model_len: int = vllm_config.model_config.max_model_len
        max_reqs: int = vllm_config.scheduler_config.max_num_seqs
        # The user's num_speculative_tokens_per_batch_size, as an upper bound per batch size.
        self._k_by_batch = per_batch_k_schedule(spec, max_reqs)
        self._tails = np.zeros((max_reqs, self.k), dtype=np.int64)
        self._guesses = np.zeros((max_reqs, self.k), dtype=np.int64)
        self._carried = np.zeros(max_reqs, dtype=np.int64)
        self._copied = np.zeros(max_reqs, dtype=np.bool_)
        self.tracker = AcceptanceTracker(self.k, max_reqs) if self.options.adaptive else None
        # Seconds per engine step against tokens run: steps with drafts, steps without.
        self.draft_step_cost = StepCostModel()
        self.plain_step_cost = StepCostModel()
        self._step_start: float | None = None
        self._step_tokens = 0
        self._step_drafts = False
        # Filled by observe_verification() for the step being sampled, consumed by propose().
        self._argmax: torch.Tensor | None = None
        self._num_draft: np.ndarray | None = None
        self._num_prompt_tokens: np.ndarray | None = None
        self._req_ids: Sequence[str] = ()
        warm_up()  # compile the fill kernels now, not inside the first timed step

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model: the target verifies its own guesses (vLLM's CPU runner calls this)."""

    def step_started(self, num_tokens: int, has_drafts: bool, continuing: bool) -> None:
        """An engine step that runs ``num_tokens`` tokens (some of them drafts, or not)
        starts now.

        The time from one step's start to the next is that step's full cost (forward pass,
        sampling, drafting, and the engine's scheduling and output handling). It is not
        recorded when the new step continues no request: the engine may have idled.
        """
        now = time.perf_counter()
        if self._step_start is not None and continuing:
            curve = self.draft_step_cost if self._step_drafts else self.plain_step_cost
            curve.observe(self._step_tokens, now - self._step_start)
        self._step_start = now if num_tokens else None
        self._step_tokens, self._step_drafts = num_tokens, has_drafts

    def observe_verification(
        self,
        logits: torch.Tensor,
        num_draft_tokens: list[int] | None,
        num_prompt_tokens: np.ndarray,
        req_ids: Sequence[str] = (),
    ) -> None:
        """Record the target's greedy token at every row vLLM is about to sample.

        With drafts, ``logits`` has ``num_draft_tokens[i] + 1`` rows for request ``i`` of
        the input batch, in batch order (vLLM's ``SpecDecodeMetadata`` layout).
        """
        self._num_prompt_tokens = num_prompt_tokens
        self._req_ids = req_ids
        if num_draft_tokens is None or not any(num_draft_tokens):
            # No guess was verified this step (vLLM 0.32 takes its speculative path even
            # so): nothing to split into exact tokens and tail.
            self._argmax = self._num_draft = None
            return
        # The argmax is taken before vLLM's sampler rescales or masks the logits in place;
        # neither temperature nor top-k/top-p moves the argmax, so this is the greedy target.
        self._argmax = logits.argmax(dim=-1)
        self._num_draft = np.asarray(num_draft_tokens, dtype=np.int64)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Return the next guess block for every request of the input batch, in batch order."""
        rows = len(sampled_token_ids)
        if rows == 0:
            return []
        if rows > len(self._guesses):  # vLLM never exceeds max_num_seqs; stay safe anyway
            self._tails = np.zeros((rows, self.k), dtype=np.int64)
            self._guesses = np.zeros((rows, self.k), dtype=np.int64)
            self._carried = np.zeros(rows, dtype=np.int64)
            self._copied = np.zeros(rows, dtype=np.bool_)
        num_new = np.fromiter(map(len, sampled_token_ids), dtype=np.int64, count=rows)
        num_tokens = num_tokens_no_spec[:rows].astype(np.int64)
        tails, tail_lens = self._tails[:rows], self._verified_tails(num_new)

        # Only rows with a sample decode next step (none: a prefill chunk, or a discarded
        # output). Leave room for the bonus token: vLLM trims a draft past max_model_len.
        room = np.minimum(self.max_model_len - num_tokens - 1, self._max_k(rows))
        max_len = np.where(num_new > 0, np.maximum(room, 0), 0)

        guesses = self._guesses[:rows]
        fill_guesses(
            token_ids_cpu, num_tokens, tails, tail_lens, self.k, self.options.fill, guesses,
            active=max_len > 0, num_prompt_tokens=self._num_prompt_tokens,
            carried=self._carried[:rows], copied=self._copied[:rows],
        )
        if self.tracker is None or len(self._req_ids) < rows:
            lengths = max_len
        else:
            lengths = self._plan(rows, num_new, num_tokens, token_ids_cpu, guesses, max_len)
        self._argmax = self._num_draft = None
        return [guesses[i, :n].tolist() if n else [] for i, n in enumerate(lengths.tolist())]

    def _max_k(self, rows: int) -> int:
        if self._k_by_batch is None:
            return self.k
        return self._k_by_batch[min(rows, len(self._k_by_batch) - 1)]

    def _verified_tails(self, num_new: np.ndarray) -> np.ndarray:
        """Fill ``self._tails`` with each row's unaccepted Jacobi tail; return its lengths.

        Row ``i`` owns argmax rows ``[off_i, off_i + d_i + 1)``; the first ``a_i + 1`` are
        exact (``a_i = num_new_i - 1`` accepted guesses), the rest is the tail.
        """
        rows = len(num_new)
        if self._argmax is None or self._num_draft is None:
            return np.zeros(rows, dtype=np.int64)
        argmax = self._argmax.cpu().numpy()
        drafted = self._num_draft[:rows]
        offsets = np.concatenate([[0], np.cumsum(drafted + 1)[:-1]])
        start = offsets + num_new  # first tail row; rows without a sample have no tail
        lens = np.where(num_new > 0, np.maximum(drafted + 1 - num_new, 0), 0)
        j = np.arange(self.k)[None, :]
        src = np.minimum(start[:, None] + j, len(argmax) - 1)
        np.copyto(self._tails[:rows], argmax[src], where=j < lens[:, None])
        return lens

    def _plan(self, rows, num_new, num_tokens, token_ids_cpu, guesses, max_len) -> np.ndarray:
        """Learn from this step's outcome, then choose every row's draft length."""
        tracker = self.tracker
        slots = tracker.slots(self._req_ids[:rows])
        # The tokens this step made exact, read from vLLM's buffer (they end each row).
        width = self.k + 1
        j = np.arange(width)[None, :]
        first = np.maximum(num_tokens - num_new, 0)
        exact = token_ids_cpu[np.arange(rows)[:, None], np.minimum(first[:, None] + j,
                                                                   token_ids_cpu.shape[1] - 1)]
        last_guess, last_len = tracker.last_guesses(slots)
        tried, matched = verified_prefix(last_guess, last_len, exact, num_new)
        tracker.observe(slots, tried, matched)
        sources = np.where(self._copied[:rows], COPY, TAIL)
        # Until both kinds of step have been timed, price one like the other: an unknown
        # draft step then looks as cheap as a plain one, so it gets tried and measured.
        drafting, plain = self.draft_step_cost, self.plain_step_cost
        if not drafting.num_observed_bins:
            drafting = plain
        if not plain.num_observed_bins:
            plain = drafting
        # A step without drafts never costs more than one with drafts and as many tokens
        # (plain steps may be rare, e.g. only prefills, while every decode step drafts).
        base = np.array([rows])
        plain_seconds = float(min(plain.predict(base)[0], drafting.predict(base)[0]))
        lengths = plan_draft_lengths(
            tracker.survival(slots, sources),
            max_len,
            drafting.predict,
            base_tokens=rows,
            base_gain=float(np.count_nonzero(num_new)),
            plain_step_cost=plain_seconds,
        )
        # Learn from carried guesses only (see cllm_vllm.adaptive), sent or not.
        carried = np.where(max_len > 0, self._carried[:rows], 0)
        tracker.remember(slots, guesses, carried, sources)
        return lengths
