"""Adaptive draft lengths: how many guess tokens each request verifies in the next step.

A fixed block of ``k`` guesses per request makes every step verify ``B * (k + 1)`` tokens
for ``B`` running requests. When the batch is small those tokens are nearly free; when it
is large (or a request's guesses keep failing) they cost compute and buy nothing. The
policy here picks a length ``d_r`` in ``0..k`` per request and step that maximises the
expected number of exact tokens per second of the whole step::

    maximise   (B + sum_r sum_{i <= d_r} s_r(i))  /  T(N_0 + sum_r d_r)

* ``s_r(i)``: the chance that request ``r``'s first ``i`` guesses are all accepted,
  ``prod_{j <= i} c_r(j)``, from its own recent steps (:class:`AcceptanceTracker`). Each
  request always gains its own next token (the ``B``); guess ``i`` adds ``s_r(i)``.
* ``T(N)``: the measured wall time of an engine step that runs ``N`` tokens
  (:class:`StepCostModel`), learnt online from the steps the engine actually runs, so the
  same code drafts long blocks on an idle GPU and few or none on a saturated CPU.

Because ``s_r(i)`` never grows with ``i``, the best plan for a given total of draft tokens
takes the largest ``s_r(i)`` over all requests; :func:`plan_draft_lengths` tries every
total at once and keeps the best ratio. Everything here is plain numpy over the batch:
no per-token Python loop.

Statistics are kept per request id only to choose lengths; what is proposed never depends
on them, so preemption, recompute and batch reordering cannot change any output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MIN_GAIN = 0.1
"""A guess whose estimated chance of acceptance is below this is never proposed: at that
level the gain is within the noise of the measured step cost, and a request that never
accepts must stop drafting rather than ride on the cost model's rounding."""

REQUEST_DECAY = 0.9
"""Forgetting per step of a request's own evidence (about its last ten steps count):
acceptance moves within a reply, e.g. when a model falls into a loop."""

POPULATION_DECAY = 0.98
"""Forgetting per step of the engine-wide evidence that new requests start from."""

PRIOR_WEIGHT = 1.0
"""How many of its own observations a request needs to outweigh the engine-wide estimate."""


def plan_draft_lengths(
    survival: np.ndarray,
    max_len: np.ndarray,
    step_cost: Callable[[np.ndarray], np.ndarray],
    base_tokens: int,
    base_gain: float,
    min_gain: float = MIN_GAIN,
) -> np.ndarray:
    """Draft length per request that maximises expected exact tokens per second.

    ``survival[r, i]``: chance that guesses ``0..i`` of request ``r`` are all accepted
    (non-increasing along ``i``); ``max_len[r]``: the most guesses ``r`` may get;
    ``step_cost(n)``: predicted seconds of a step running ``n`` tokens (vectorised);
    ``base_tokens`` / ``base_gain``: tokens run and exact tokens gained without any guess.
    """
    rows, k = survival.shape
    positions = np.arange(k)
    usable = (positions[None, :] < np.asarray(max_len)[:, None]) & (survival >= min_gain)
    gains = survival[usable]
    if gains.size == 0:
        return np.zeros(rows, dtype=np.int64)
    order = np.argsort(-gains, kind="stable")
    expected = base_gain + np.concatenate([[0.0], np.cumsum(gains[order])])
    seconds = step_cost(base_tokens + np.arange(gains.size + 1))
    best = int(np.argmax(expected / seconds))  # the first best: fewer tokens on a tie
    owners = np.nonzero(usable)[0][order[:best]]
    return np.bincount(owners, minlength=rows).astype(np.int64)


class StepCostModel:
    """Seconds per engine step as a function of the tokens it runs, measured online.

    Observations are binned on a log scale (four bins per doubling) and averaged with
    exponential forgetting, so the curve follows drift (other load, longer contexts).
    Between bins the prediction is linear; below the smallest measured size it is flat;
    above the largest it extends the slope of its upper half. With one bin or none it is
    flat: untried sizes look cheap, so the policy tries them once and learns their cost.

    Errors must stay optimistic, or the policy stops trying the sizes that would correct
    them: one stalled step (a first call, a page fault, another process) counts at most
    ``SPIKE`` times the current prediction, and where a larger size measured cheaper than
    a smaller one the smaller one is believed to cost no more.
    """

    BINS_PER_DOUBLING = 4
    MEMORY = 32  # steps: the weight of a bin's newest observation is at least 1/32
    SPIKE = 2.0  # a sustained rise is still learnt: the prediction can double each step

    def __init__(self, max_tokens: int = 1 << 20) -> None:
        n_bins = self._bin(max_tokens) + 1
        self._weight = np.zeros(n_bins)
        self._tokens = np.zeros(n_bins)
        self._seconds = np.zeros(n_bins)

    def _bin(self, tokens: int) -> int:
        return int(round(self.BINS_PER_DOUBLING * np.log2(max(tokens, 1))))

    def observe(self, tokens: int, seconds: float) -> None:
        if self.num_observed_bins:
            seconds = min(seconds, self.SPIKE * float(self.predict(np.array([tokens]))[0]))
        b = min(self._bin(tokens), len(self._weight) - 1)
        w = self._weight[b] = min(self._weight[b] + 1.0, self.MEMORY)
        self._tokens[b] += (tokens - self._tokens[b]) / w
        self._seconds[b] += (seconds - self._seconds[b]) / w

    @property
    def num_observed_bins(self) -> int:
        return int(np.count_nonzero(self._weight))

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        seen = self._weight > 0
        if not seen.any():
            return np.ones_like(tokens)
        xs = self._tokens[seen]
        # A step never gets cheaper by running more tokens: where noise says otherwise,
        # believe the cheaper, larger step.
        ys = np.minimum.accumulate(self._seconds[seen][::-1])[::-1]
        out = np.interp(tokens, xs, ys)
        lo = int(np.searchsorted(xs, xs[-1] / 2))
        slope = (ys[-1] - ys[lo]) / (xs[-1] - xs[lo]) if lo < len(xs) - 1 else 0.0
        above = tokens > xs[-1]
        out[above] = ys[-1] + slope * (tokens[above] - xs[-1])
        return out


class AcceptanceTracker:
    """Position-wise acceptance per request, with forgetting, over fixed-size slots.

    ``c_r(i)``, the chance that guess ``i`` is accepted once guesses ``< i`` were, is
    estimated from decayed counts of the request's own trials, shrunk towards the
    engine-wide estimate (what a new request starts from: a CLLM's engine starts new
    requests with long drafts, a plain model's with short ones).
    """

    def __init__(self, k: int, capacity: int) -> None:
        self.k = k
        self._slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._hits = np.zeros((capacity, k))
        self._trials = np.zeros((capacity, k))
        # Each request's last full guess (sent or not), to score against what followed.
        self._guess = np.zeros((capacity, k), dtype=np.int64)
        self._guess_len = np.zeros(capacity, dtype=np.int64)
        # Engine-wide counts, one pseudo-trial at 1/2 to start from.
        self._pop_hits = np.full(k, 0.5)
        self._pop_trials = np.ones(k)

    def __len__(self) -> int:
        return len(self._slot_of)

    def slots(self, req_ids: Sequence[str | None]) -> np.ndarray:
        """Slots of this batch's requests (new ones get fresh slots); forget the others."""
        live = set(req_ids)
        for gone in [r for r in self._slot_of if r not in live]:
            self._free.append(self._slot_of.pop(gone))
        out = np.empty(len(req_ids), dtype=np.int64)
        for i, r in enumerate(req_ids):
            slot = self._slot_of.get(r)
            if slot is None:
                if not self._free:  # more requests than planned: grow
                    self._grow()
                slot = self._slot_of[r] = self._free.pop()
                self._hits[slot] = self._trials[slot] = 0.0
                self._guess_len[slot] = 0
            out[i] = slot
        return out

    def _grow(self) -> None:
        n = len(self._hits)
        for name in ("_hits", "_trials", "_guess", "_guess_len"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def remember(self, slots: np.ndarray, guesses: np.ndarray, lengths: np.ndarray) -> None:
        """Keep each row's full guess (its first ``lengths[r]`` tokens) for the next step."""
        self._guess[slots] = guesses
        self._guess_len[slots] = lengths

    def last_guesses(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._guess[slots], self._guess_len[slots]

    def observe(self, slots: np.ndarray, tried: np.ndarray, matched: np.ndarray) -> None:
        """Record one step: ``tried[r]`` guess positions were checked, the first
        ``matched[r]`` of them held (``matched <= tried``); rows with ``tried == 0``
        carry no evidence and keep their counts."""
        positions = np.arange(self.k)[None, :]
        trial = (positions < tried[:, None]).astype(np.float64)
        hit = (positions < matched[:, None]).astype(np.float64)
        has = tried > 0
        s = slots[has]
        self._hits[s] = self._hits[s] * REQUEST_DECAY + hit[has]
        self._trials[s] = self._trials[s] * REQUEST_DECAY + trial[has]
        self._pop_hits = self._pop_hits * POPULATION_DECAY + hit.sum(axis=0)
        self._pop_trials = self._pop_trials * POPULATION_DECAY + trial.sum(axis=0)

    def survival(self, slots: np.ndarray) -> np.ndarray:
        """``s_r(i)`` for each row: the chance that its guesses ``0..i`` are all accepted."""
        prior = self._pop_hits / self._pop_trials
        cond = (self._hits[slots] + PRIOR_WEIGHT * prior) / (
            self._trials[slots] + PRIOR_WEIGHT
        )
        return np.cumprod(cond, axis=1)


def verified_prefix(guess: np.ndarray, guess_len: np.ndarray, exact: np.ndarray,
                    exact_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compare each row's last guess with the exact tokens that followed it.

    Returns ``(tried, matched)`` per row: ``matched`` is the length of the common prefix,
    ``tried`` the positions whose outcome is known (the matched ones and the first
    mismatch, within both lengths). Guesses that were computed but not sent count as
    well: their outcome is as known as a verified one's, so a request that drafts nothing
    still measures what its next guess would have got.
    """
    width = min(guess.shape[1], exact.shape[1])
    known = np.minimum(guess_len, exact_len)
    positions = np.arange(width)[None, :]
    same = (guess[:, :width] == exact[:, :width]) & (positions < known[:, None])
    matched = np.cumprod(same, axis=1).sum(axis=1)
    tried = np.minimum(matched + 1, known)
    return tried, matched
