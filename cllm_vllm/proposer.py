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

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np
import torch

from cllm_vllm.adaptive import (
    COPY,
    FULL,
    MIN_GAIN,
    PLAN,
    SHORT_BLOCK,
    TAIL,
    AcceptanceTracker,
    BlockChooser,
    StepCostModel,
    align_step,
    expected_rate,
    plan_draft_lengths,
    rest_after_plan,
    sent_survival,
)
from cllm_vllm.adaptive import warm_up as compile_policy
from cllm_vllm.config import JacobiOptions
from cllm_vllm.fill import fill_guesses
from cllm_vllm.fill import warm_up as compile_fill

# Under vLLM's logger, which vLLM configures (level, format, the process prefix); a plain
# module logger would stay silent at INFO.
logger = logging.getLogger(f"vllm.{__name__}")
SPIKE = StepCostModel.SPIKE
GROWTH = 2.0
"""A plan sends at most this many times the largest number of guesses whose cost was
measured lately (or ``k``, whichever is more): beyond it the cost model is optimistic by
design (an untried size must get tried), and on a busy CPU a jump from 64 guesses to 300
cost three plain steps."""
MAX_STOP_IDS = 4
"""Stop tokens per request known to the alignment of step sizes (EOS and the first few
``stop_token_ids``): a request that stops leaves the next step."""
MAX_UNLEARNT = 64
"""Step times are learnt from in bulk when the policy next plans, or after this many."""
NO_LIMIT = np.iinfo(np.int64).max


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
        # Hybrid (recurrent) models never run a step as if no drafter were configured:
        # their backends keep speculative state across steps (see cllm_vllm.vllm_hooks).
        self.is_hybrid = bool(vllm_config.model_config.is_hybrid)
        max_reqs: int = vllm_config.scheduler_config.max_num_seqs
        # The user's num_speculative_tokens_per_batch_size, as an upper bound per batch size.
        self._k_by_batch = per_batch_k_schedule(spec, max_reqs)
        self._tails = np.zeros((max_reqs, self.k), dtype=np.int64)
        self._guesses = np.zeros((max_reqs, self.k), dtype=np.int64)
        self._carried = np.zeros(max_reqs, dtype=np.int64)
        self._copied = np.zeros(max_reqs, dtype=np.bool_)
        self.tracker = AcceptanceTracker(self.k, max_reqs) if self.options.adaptive else None
        self.chooser = BlockChooser() if self.options.adaptive else None
        # Seconds of an engine step without guesses, by the tokens it runs; and what the
        # guesses of a step add to it, by their number (see cllm_vllm.adaptive).
        self.plain_cost = StepCostModel()
        self.extra_cost = StepCostModel(through_zero=True)
        self._step_start: float | None = None
        self._step_tokens = self._step_guesses = 0
        # Steps timed, not yet learnt from: tokens, guesses, seconds, rested through.
        self._timed: list[tuple[int, int, float, bool]] = []
        self._step_rested = False
        self._seeded_ids: set[str] = set()  # live requests with a seed
        # The first step of each kind pays one-time costs (first calls): not recorded.
        self._first = {"plain": True, "extra": True}
        # Filled by observe_verification() for the step being sampled, consumed by propose().
        self._argmax: torch.Tensor | None = None
        self._num_draft: np.ndarray | None = None
        self._num_prompt_tokens: np.ndarray | None = None
        self._req_ids: Sequence[str] = ()
        # vLLM's request states by id (the runner's): how each request stops.
        self._requests: Mapping[str, Any] | None = None
        self._max_output = np.full(max_reqs, NO_LIMIT, dtype=np.int64)
        self._stop_ids = np.full((max_reqs, MAX_STOP_IDS), -1, dtype=np.int64)
        self._seeded_rows: Sequence[int] = ()
        self._rest = 0  # steps left to rest
        self._rest_level = 0  # the rest schedule's level (see rest_after_plan)
        self._drafted = False  # whether the last plan sent guesses
        self._rested = False
        # Compile the kernels (or load them from numba's cache) now, not inside the first
        # timed step. (The tail split's compiling call writes nothing that is read.)
        compile_fill()
        _split_tails(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64),
                     self._tails)
        for dtype in (np.int32, np.int64):  # vLLM's buffer, and tests' arrays
            _draft_room(np.ones(1, dtype), np.ones(1, np.int64), 8, 1)
        _greedy_verify(np.zeros(2, np.int64), np.zeros(1, np.int32), np.ones(1, np.int64), 2)
        for dtype in (np.int32, np.int64):  # vLLM's buffers, and tests' arrays
            _stopping_rows(np.zeros(1, np.int64), np.zeros((1, 2), dtype), np.ones(1, np.int64),
                           np.ones(1, np.int64), np.zeros(1, dtype), self._max_output,
                           self._stop_ids, 8)
        if self.tracker is not None:
            compile_policy()
        logger.info("Jacobi drafting: k=%d, fill=%s, adaptive=%s", self.k,
                    self.options.fill, self.options.adaptive)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model: the target verifies its own guesses (vLLM's CPU runner calls this)."""

    def step_started(self, num_tokens: int, num_guesses: int, continuing: bool) -> None:
        """An engine step that runs ``num_tokens`` tokens, ``num_guesses`` of them guesses,
        starts now.

        The time from one step's start to the next is that step's full cost (forward pass,
        sampling, drafting, and the engine's scheduling and output handling). It is not
        recorded when the new step continues no request: the engine may have idled. Only
        the time is taken here; the cost models learn from it when they are next read
        (:meth:`_learn_step_costs`): a resting engine's steps cost next to nothing more.
        """
        now = time.perf_counter()
        if self._step_start is not None and continuing:
            self._timed.append((self._step_tokens, self._step_guesses,
                                now - self._step_start, self._step_rested))
            if len(self._timed) >= MAX_UNLEARNT:
                self._learn_step_costs()
        self._step_start = now if num_tokens else None
        self._step_tokens, self._step_guesses = num_tokens, num_guesses
        self._step_rested = False

    def note_requests(self, seeded: Sequence[str], finished: Any) -> None:
        """Requests that joined this step with a seed, and requests that finished."""
        self._seeded_ids.update(seeded)
        if self._seeded_ids and finished:
            self._seeded_ids.difference_update(finished)

    def rest_through_step(self) -> bool:
        """Whether the step that starts now, which carries no guess, is one the policy
        rests through (see ``rest_after_plan``): then it drafts nothing at its end, and the
        engine may run the step as if no drafter were configured (:meth:`rested`).
        Never while a seeded request lives: its drafts must not depend on the clock."""
        if not self._rest or self._seeded_ids:
            return False
        self._rest_one_step()
        self._step_rested = True
        return True

    def _rest_one_step(self) -> None:
        """Spend one step of the rest: nothing is drafted, nothing verified is kept."""
        self._rest, self._rested = self._rest - 1, True
        self._argmax = self._num_draft = None

    def rested(self, sampled_token_ids: Sequence[Sequence[int]]) -> None:
        """A step the policy rested through made ``sampled_token_ids`` (and drafted nothing)."""
        if self.chooser is not None:
            self.chooser.made(sum(map(len, sampled_token_ids)))

    def _learn_step_costs(self) -> None:
        """Feed the step times taken since the last call to the cost models and the block
        chooser, in order."""
        plain_cost, extra_cost = self.plain_cost, self.extra_cost
        for tokens, guesses, seconds, rested in self._timed:
            if self.chooser is not None:
                self.chooser.took(seconds)
            base = tokens - guesses
            kind = "extra" if guesses else "plain"
            if rested:
                # A step run without vLLM's speculative path: cheaper than any step that
                # could draft, which is what a drafting step is weighed against (P).
                extra_cost.age()
            elif self._first[kind]:
                self._first[kind] = False
            elif kind == "plain":
                # A stalled step counts at most SPIKE times the prediction, even at a new size.
                plain_cost.observe(base, seconds, capped=True)
                # What guesses add fades too while none are sent: nothing would correct
                # a cost believed too high (a stalled step); forgotten, it is probed again.
                extra_cost.age()
            elif not plain_cost.knows(base):
                # Only steps with guesses run at this size (seeded requests always draft):
                # the step is an upper bound of a plain one, the guesses' cost unknown.
                plain_cost.observe(base, seconds)
            else:
                plain = plain_cost.predict_one(base)
                extra = extra_cost.predict_one(guesses) if extra_cost.num_observed_bins else 0.0
                extra_cost.observe(guesses, max(seconds - plain, 0.0),
                                   limit=SPIKE * (plain + extra) - plain)
        self._timed.clear()

    def observe_verification(
        self,
        logits: torch.Tensor,
        num_draft_tokens: list[int] | None,
        num_prompt_tokens: np.ndarray,
        req_ids: Sequence[str] = (),
        seeded_rows: Sequence[int] = (),
        requests: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the target's greedy token at every row vLLM is about to sample.

        With drafts, ``logits`` has ``num_draft_tokens[i] + 1`` rows for request ``i`` of
        the input batch, in batch order (vLLM's ``SpecDecodeMetadata`` layout).
        """
        self._num_prompt_tokens = num_prompt_tokens
        self._req_ids = req_ids
        self._requests = requests
        self._seeded_rows = seeded_rows
        if num_draft_tokens is None or not any(num_draft_tokens):
            # No guess was verified this step (vLLM 0.32 takes its speculative path even
            # so): nothing to split into exact tokens and tail.
            self._argmax = self._num_draft = None
            return
        # The argmax is taken before vLLM's sampler rescales or masks the logits in place;
        # neither temperature nor top-k/top-p moves the argmax, so this is the greedy target.
        self._argmax = logits.argmax(dim=-1)
        self._num_draft = np.asarray(num_draft_tokens, dtype=np.int64)

    def verify_greedy(self, draft_token_ids: torch.Tensor, width: int) -> torch.Tensor:
        """vLLM's greedy verification of this step's guesses, from the argmax that
        :meth:`observe_verification` took: each row is the longest prefix of guesses that
        matches the target, then the target's own next token, padded with -1 to ``width``
        (vLLM's ``SamplerOutput.sampled_token_ids``). For a batch that vLLM would sample
        by argmax alone (see ``cllm_vllm.vllm_hooks``): its rejection sampler copies and
        rescales every row's logits first, some 0.15 ms of a CPU step at batch 1."""
        assert self._argmax is not None and self._num_draft is not None
        return torch.from_numpy(_greedy_verify(self._argmax.numpy(), draft_token_ids.numpy(),
                                               self._num_draft, width))

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
        if self.chooser is not None:
            self.chooser.made(sum(map(len, sampled_token_ids)))
        if self._rest and not self._seeded_rows:
            # The last plans sent no guess at all (a busy engine, or guesses that fail):
            # rest (see rest_after_plan). Nothing is lost but evidence (the next plan scores
            # nothing). No numpy on this path: a resting step should cost next to nothing.
            self._rest_one_step()
            return [[] for _ in range(rows)]
        num_new = np.fromiter(map(len, sampled_token_ids), dtype=np.int64, count=rows)
        if rows > len(self._guesses):  # vLLM never exceeds max_num_seqs; stay safe anyway
            self._tails = np.zeros((rows, self.k), dtype=np.int64)
            self._guesses = np.zeros((rows, self.k), dtype=np.int64)
            self._carried = np.zeros(rows, dtype=np.int64)
            self._copied = np.zeros(rows, dtype=np.bool_)
        num_tokens, max_len = _draft_room(num_tokens_no_spec, num_new, self.max_model_len,
                                          int(self._max_k(rows)))
        tails, tail_lens = self._tails[:rows], self._verified_tails(num_new)

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
            drafted = bool(lengths.any())
            self._rest_level, self._rest = rest_after_plan(self._rest_level, drafted,
                                                           again=self._drafted)
            self._drafted = drafted
        self._argmax = self._num_draft = None
        return [guesses[i, :n].tolist() if n else [] for i, n in enumerate(lengths.tolist())]

    def _max_k(self, rows: int) -> int:
        if self._k_by_batch is None:
            return self.k
        return self._k_by_batch[min(rows, len(self._k_by_batch) - 1)]

    def _verified_tails(self, num_new: np.ndarray) -> np.ndarray:
        """Fill ``self._tails`` with each row's unaccepted Jacobi tail; return its lengths."""
        rows = len(num_new)
        if self._argmax is None or self._num_draft is None:
            return np.zeros(rows, dtype=np.int64)
        return _split_tails(self._argmax.cpu().numpy(), self._num_draft[:rows], num_new,
                            self._tails)

    def _note_stops(self, slots: np.ndarray) -> None:
        """Read how the requests that joined stop (vLLM's ``check_stop``: EOS, stop token
        ids, ``max_tokens``) into their slots; unknown, a request never stops early."""
        requests = self._requests or {}
        if len(self._max_output) < self.tracker.capacity:  # the tracker grew
            grow = self.tracker.capacity - len(self._max_output)
            self._max_output = np.concatenate(
                [self._max_output, np.full(grow, NO_LIMIT)])
            self._stop_ids = np.concatenate(
                [self._stop_ids, np.full((grow, MAX_STOP_IDS), -1, dtype=np.int64)])
        for row in self.tracker.joined:
            state = requests.get(self._req_ids[row])
            params = getattr(state, "sampling_params", None)
            slot = slots[row]
            self._max_output[slot] = NO_LIMIT
            self._stop_ids[slot] = -1
            if params is None:
                continue
            if params.max_tokens is not None:
                self._max_output[slot] = params.max_tokens
            stops = [params.eos_token_id] if params.eos_token_id is not None else []
            stops += list(params.stop_token_ids or ())
            stops = stops[:MAX_STOP_IDS]
            self._stop_ids[slot, :len(stops)] = stops

    def _plan(self, rows, num_new, num_tokens, token_ids_cpu, guesses, max_len) -> np.ndarray:
        """Learn from this step's outcome, then choose every row's draft length."""
        self._learn_step_costs()
        tracker = self.tracker
        slots = tracker.slots(self._req_ids[:rows])
        self._note_stops(slots)
        # Rows that stop with this step's tokens leave the batch: they neither draft nor
        # count towards the next step's size.
        prompt = self._num_prompt_tokens
        leaving = _stopping_rows(slots, token_ids_cpu, num_tokens, num_new,
                                 np.zeros(rows, np.int64) if prompt is None else prompt,
                                 self._max_output, self._stop_ids, self.max_model_len)
        max_len = np.where(leaving, 0, max_len)
        # The tokens this step made exact, read from vLLM's buffer (they end each row);
        # after a rest the remembered guesses are a step older than them.
        sent = tracker.score(slots, token_ids_cpu, num_tokens, num_new, stale=self._rested)
        self._rested = False
        sources = np.where(self._copied[:rows], COPY, TAIL)
        if not self.plain_cost.knows(rows) and not self._seeded_rows:
            # What a step without guesses costs at this batch size is not known (lately):
            # run one and measure it, so that what guesses add can be told apart. (Seeded
            # requests always draft; then the nearest size measured has to do.)
            lengths = np.zeros(rows, dtype=np.int64)
        else:
            # A request that keeps drafting is judged at its steady state (all carried);
            # one that would start, by its actual guess (see cllm_vllm.adaptive).
            carried = np.where(sent, self.k, self._carried[:rows])
            known = self.extra_cost.num_observed_bins > 0
            survival = tracker.survival(slots, carried, sources) * tracker.calibration(rows)
            plain = self.plain_cost.predict_one(rows)
            # Rows that decode: each gains one sure token, and runs one token next step
            # (the base that align_step sizes the step from).
            decoding = int(np.count_nonzero(num_new)) - int(np.count_nonzero(leaving))
            base_gain = float(decoding)
            # Nothing measured (lately) of what guesses cost: they look free, so they get
            # tried and timed, one per request at most (a bounded probe).
            cap = max_len if known else np.minimum(max_len, 1)
            lengths = plan_draft_lengths(
                survival,
                cap,
                plain_seconds=plain,
                extra_seconds=self.extra_cost.predict if known else np.zeros_like,
                base_gain=base_gain,
                # Past the largest number of guesses measured lately, costs are guessed
                # (optimistically, to be tried): a try at most doubles it, or reaches one
                # block (a first probe of one guess must not cap the plan at two).
                max_total=max(int(GROWTH * self.extra_cost.largest_measured()), self.k)
                if known else None,
            )

            # A block, for every request whose next guess has a fair chance (one that
            # never accepts stays out of it); built only when the chooser asks.
            def block(arm: int) -> np.ndarray:
                size = max_len if arm == FULL else np.maximum(
                    lengths, np.minimum(max_len, SHORT_BLOCK))
                return np.where(survival[:, 0] >= MIN_GAIN, size, lengths)

            def plausible(arm: int) -> bool:
                if not known:
                    return False
                rate = functools.partial(expected_rate, survival, plain_seconds=plain,
                                         extra_seconds=self.extra_cost.predict_in_proportion,
                                         base_gain=base_gain)
                return rate(block(arm)) >= self.chooser.PLAUSIBLE * rate(lengths)

            arm = self.chooser.choose(rows, plausible)
            if arm != PLAN:
                lengths = block(arm)
            # A step runs one of a few sizes (see cllm_vllm.adaptive.STEP_SIZES_PER_DOUBLING).
            align_step(lengths, survival, cap, decoding, MIN_GAIN)
            if self._seeded_rows:
                # A seeded request's random stream follows its drafts: they must not depend
                # on the batch or the clock, so it drafts the full block.
                seeded = np.asarray(self._seeded_rows, dtype=np.int64)
                seeded = seeded[seeded < rows]
                lengths[seeded] = max_len[seeded]
            tracker.promise(sent_survival(survival, lengths), rows)
        # Every guess is scored against what follows, sent or not (see cllm_vllm.adaptive).
        tracker.remember(slots, guesses, max_len, self._carried[:rows], sources, lengths)
        return lengths


@numba.njit(cache=True)
def _draft_room(num_tokens_no_spec, num_new, max_model_len, max_k):
    """Each row's exact tokens (int64) and the most guesses it may get. Only rows with a
    sample decode next step (none: a prefill chunk, or a discarded output); room is left
    for the bonus token (vLLM trims a draft past ``max_model_len``)."""
    rows = len(num_new)
    num_tokens = np.empty(rows, np.int64)
    max_len = np.zeros(rows, np.int64)
    for i in range(rows):
        num_tokens[i] = num_tokens_no_spec[i]
        if num_new[i] > 0:
            max_len[i] = max(min(max_model_len - num_tokens[i] - 1, max_k), 0)
    return num_tokens, max_len


@numba.njit(cache=True)
def _split_tails(argmax, drafted, num_new, tails):
    """Row ``i`` of the batch owns argmax rows ``[off_i, off_i + d_i + 1)``: the first
    ``a_i + 1`` are exact (``a_i = num_new_i - 1`` accepted guesses), the rest is its
    tail, copied to ``tails[i]``. Rows without a sample (a prefill chunk) have no tail."""
    lens = np.zeros(len(num_new), np.int64)
    offset = 0
    for i in range(len(num_new)):
        if num_new[i] > 0:
            lens[i] = min(max(drafted[i] + 1 - num_new[i], 0), tails.shape[1])
            for j in range(lens[i]):
                tails[i, j] = argmax[min(offset + num_new[i] + j, len(argmax) - 1)]
        offset += drafted[i] + 1
    return lens


@numba.njit(cache=True)
def _greedy_verify(argmax, drafts, num_draft, width):
    """Row ``i`` of the batch owns argmax rows ``[off_i, off_i + d_i + 1)`` and drafts
    ``[doff_i, doff_i + d_i)``: its output is the argmax along the matching prefix of the
    drafts and at the first mismatch (or after the last draft), then -1."""
    out = np.full((len(num_draft), width), -1, np.int32)
    offset = drafted = 0
    for i in range(len(num_draft)):
        d = num_draft[i]
        j = 0
        while j < d and drafts[drafted + j] == argmax[offset + j]:
            out[i, j] = argmax[offset + j]
            j += 1
        out[i, j] = argmax[offset + j]
        offset += d + 1
        drafted += d
    return out


@numba.njit(cache=True)
def _stopping_rows(slots, tokens, num_tokens, num_new, num_prompt_tokens, max_output,
                   stop_ids, max_model_len):
    """Rows whose request stops with this step's tokens (as vLLM's scheduler will see it):
    one of its new tokens is a stop token, or it reached ``max_tokens`` or the model's
    length. (min_tokens and stop strings are not foreseen.)"""
    out = np.zeros(len(slots), np.bool_)
    for r in range(len(slots)):
        n = num_tokens[r]
        if num_new[r] == 0:
            continue
        s = slots[r]
        if n >= max_model_len or n - num_prompt_tokens[r] >= max_output[s]:
            out[r] = True
            continue
        for j in range(max(n - num_new[r], 0), n):
            for i in range(stop_ids.shape[1]):
                if stop_ids[s, i] >= 0 and tokens[r, j] == stop_ids[s, i]:
                    out[r] = True
    return out
