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
  Only *carried* guesses are learnt from: the Jacobi tail (refined by the last step) and
  n-gram copies, not the fill's made-up top-up. ``s_r`` is what a request gets when it
  keeps drafting (its guesses are then mostly carried), so a request with a short draft,
  whose fresh top-up is rarely accepted, does not talk itself into ever shorter drafts.
  Tails and copies are counted apart (a CLLM's tails are good where a copy-first fill's
  copies are not, and the reverse for a model that loops): the next guess is judged by
  the record of its own source.
* ``T(N)``: the measured wall time of an engine step that runs ``N`` tokens
  (:class:`StepCostModel`), learnt online from the steps the engine actually runs, so the
  same code drafts long blocks on an idle GPU and few or none on a saturated CPU. Steps
  that carry no draft at all skip vLLM's verification (rejection sampler, per-position
  logits) and are measured on a curve of their own: the plan with no draft is priced
  on it.

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

POPULATION_DECAY = 0.995
"""Forgetting of the engine-wide evidence that new requests start from, per request-step
that brings new evidence (about the last 200): it does not fade while nothing is learnt,
so a loaded engine whose requests all rest keeps what it knew of them."""

PRIOR_WEIGHT = 1.0
"""How many of its own observations a request needs to outweigh the engine-wide estimate."""

OPTIMISM = 0.9
"""The conditional acceptance assumed where the engine has no recent evidence (one
pseudo-trial that never fades). Optimism keeps the estimates honest: a position believed
too good is drafted and corrected at once, one believed too poor would never be drafted
again. Deep positions tend to hold once the ones before them do (a Jacobi prefix that is
right makes the next prediction right), which a CLLM shows most."""


def plan_draft_lengths(
    survival: np.ndarray,
    max_len: np.ndarray,
    step_cost: Callable[[np.ndarray], np.ndarray],
    base_tokens: int,
    base_gain: float,
    min_gain: float = MIN_GAIN,
    plain_step_cost: float | None = None,
) -> np.ndarray:
    """Draft length per request that maximises expected exact tokens per second.

    ``survival[r, i]``: chance that guesses ``0..i`` of request ``r`` are all accepted
    (non-increasing along ``i``); ``max_len[r]``: the most guesses ``r`` may get;
    ``step_cost(n)``: predicted seconds of a step running ``n`` tokens with drafts
    (vectorised); ``plain_step_cost``: seconds of the step without any draft (default
    ``step_cost(base_tokens)``); ``base_tokens`` / ``base_gain``: tokens run and exact
    tokens gained without any guess.
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
    if plain_step_cost is not None:
        seconds[0] = plain_step_cost
    best = int(np.argmax(expected / seconds))  # the first best: fewer tokens on a tie
    owners = np.nonzero(usable)[0][order[:best]]
    return np.bincount(owners, minlength=rows).astype(np.int64)


class StepCostModel:
    """Seconds per engine step as a function of the tokens it runs, measured online.

    Observations are binned on a log scale (four bins per doubling) and averaged with
    exponential forgetting, so the curve follows drift (other load, longer contexts).
    Between bins the prediction is linear; outside the measured sizes it is flat, so an
    untried larger step looks no dearer than the largest one measured: the policy tries
    it once and learns its cost (about four tries per doubling of the step's size).

    Errors must stay optimistic, or the policy stops trying the sizes that would correct
    them: one stalled step (a first call, a page fault, another process) counts at most
    ``SPIKE`` times the current prediction; where a larger size measured cheaper than a
    smaller one the smaller one is believed to cost no more; and every bin's evidence
    fades a little each step, a bin left unvisited for long enough is dropped (its cost
    is then read off its neighbours): a size that looked dear long ago is tried again.
    """

    BINS_PER_DOUBLING = 4
    MEMORY = 32  # steps: the weight of a bin's newest observation is at least 1/32
    SPIKE = 2.0  # a sustained rise is still learnt: the prediction can double each step
    FADE = 0.99  # per step: a bin's weight halves in ~70 steps without a visit...
    DROP = 0.25  # ...and below this it no longer counts (~140 steps after one visit)

    def __init__(self, max_tokens: int = 1 << 20) -> None:
        n_bins = self._bin(max_tokens) + 1
        self._weight = np.zeros(n_bins)
        self._tokens = np.zeros(n_bins)
        self._seconds = np.zeros(n_bins)
        self.num_observed_bins = 0
        self._xs = self._ys = np.zeros(0)

    def _bin(self, tokens: int) -> int:
        return int(round(self.BINS_PER_DOUBLING * np.log2(max(tokens, 1))))

    def observe(self, tokens: int, seconds: float) -> None:
        if self.num_observed_bins:
            seconds = min(seconds, self.SPIKE * float(self.predict(np.array([tokens]))[0]))
        b = min(self._bin(tokens), len(self._weight) - 1)
        self._weight *= self.FADE
        w = self._weight[b] = min(self._weight[b] + 1.0, self.MEMORY)
        self._tokens[b] += (tokens - self._tokens[b]) / w
        self._seconds[b] += (seconds - self._seconds[b]) / w
        seen = self._weight >= self.DROP
        self.num_observed_bins = int(np.count_nonzero(seen))
        # The curve predict() reads, rebuilt once per observation (predict runs more often).
        # A step never gets cheaper by running more tokens: where noise says otherwise,
        # believe the cheaper, larger step.
        self._xs = self._tokens[seen]
        self._ys = np.minimum.accumulate(self._seconds[seen][::-1])[::-1]

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        if not self.num_observed_bins:
            return np.ones_like(tokens)
        return np.interp(tokens, self._xs, self._ys)


TAIL, COPY = 0, 1
"""Sources of a carried guess: the Jacobi tail, or a copy-first fill's n-gram copy."""


class AcceptanceTracker:
    """Position-wise acceptance per request and guess source, with forgetting.

    ``c_r(i)``, the chance that guess ``i`` is accepted once guesses ``< i`` were, is
    estimated from decayed counts of the request's own trials, shrunk towards the
    engine-wide estimate (what a new request starts from: a CLLM's engine starts new
    requests with long drafts, a plain model's with short ones). Requests live in
    fixed-size slots of preallocated arrays, indexed per step in one numpy operation.
    """

    def __init__(self, k: int, capacity: int) -> None:
        self.k = k
        self._slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._hits = np.zeros((capacity, 2, k))
        self._trials = np.zeros((capacity, 2, k))
        # Each request's last full guess (sent or not), to score against what followed.
        self._guess = np.zeros((capacity, k), dtype=np.int64)
        self._guess_len = np.zeros(capacity, dtype=np.int64)
        self._guess_source = np.zeros(capacity, dtype=np.int64)
        # Engine-wide evidence per source (decayed counts).
        self._pop_hits = np.zeros((2, k))
        self._pop_trials = np.zeros((2, k))

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
        for name in ("_hits", "_trials", "_guess", "_guess_len", "_guess_source"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def remember(self, slots: np.ndarray, guesses: np.ndarray, lengths: np.ndarray,
                 sources: np.ndarray) -> None:
        """Keep each row's guess (its first ``lengths[r]`` tokens, from ``sources[r]``)
        to score against the tokens that follow it."""
        self._guess[slots] = guesses
        self._guess_len[slots] = lengths
        self._guess_source[slots] = sources

    def last_guesses(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._guess[slots], self._guess_len[slots]

    def observe(self, slots: np.ndarray, tried: np.ndarray, matched: np.ndarray) -> None:
        """Record one step: ``tried[r]`` guess positions were checked, the first
        ``matched[r]`` of them held (``matched <= tried``). Every row's old evidence
        fades, so a request with none (it drafts nothing and has no copy to check)
        drifts back to the engine-wide estimate and is tried again if that is good."""
        positions = np.arange(self.k)[None, :]
        trial = (positions < tried[:, None]).astype(np.float64)
        hit = (positions < matched[:, None]).astype(np.float64)
        source = self._guess_source[slots]
        self._hits[slots] *= REQUEST_DECAY
        self._trials[slots] *= REQUEST_DECAY
        self._hits[slots, source] += hit
        self._trials[slots, source] += trial
        fade = POPULATION_DECAY ** np.count_nonzero(tried)
        self._pop_hits *= fade
        self._pop_trials *= fade
        for src in (TAIL, COPY):
            mine = source == src
            self._pop_hits[src] += hit[mine].sum(axis=0)
            self._pop_trials[src] += trial[mine].sum(axis=0)

    def survival(self, slots: np.ndarray, sources: np.ndarray | None = None) -> np.ndarray:
        """``s_r(i)`` for each row: the chance that its guesses ``0..i`` are all accepted,
        for a guess from ``sources[r]`` (default: the tail)."""
        src = np.zeros(len(slots), dtype=np.int64) if sources is None else sources
        prior = ((self._pop_hits + OPTIMISM) / (self._pop_trials + 1.0))[src]
        cond = (self._hits[slots, src] + PRIOR_WEIGHT * prior) / (
            self._trials[slots, src] + PRIOR_WEIGHT
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
