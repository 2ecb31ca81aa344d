"""The adaptive draft-length policy as pure functions: plan, step cost, acceptance."""

from __future__ import annotations

import numpy as np
import pytest

from cllm_vllm.adaptive import (
    COPY,
    FRESH,
    FULL,
    MAX_REST,
    MIN_GAIN,
    OPTIMISM,
    PLAN,
    SHORT,
    TAIL,
    AcceptanceTracker,
    BlockChooser,
    StepCostModel,
    align_step,
    expected_rate,
    plan_draft_lengths,
    rest_after_plan,
    step_size_at_most,
    verified_prefix,
)

K = 16


def linear_cost(fixed: float, per_token: float):
    return lambda n: fixed + per_token * np.asarray(n, dtype=np.float64)


def plan(survival, max_len, cost, base_tokens, base_gain, **kw):
    """plan_draft_lengths for a step cost ``cost(tokens)``: the plain step runs
    ``base_tokens``, guesses add the rest."""
    plain = float(cost(base_tokens))
    return plan_draft_lengths(survival, max_len, plain,
                              lambda m: cost(base_tokens + m) - plain, base_gain, **kw)


def survival_of(rates: list[float]) -> np.ndarray:
    """Rows whose guesses are each accepted with the given conditional rate."""
    return np.array([np.full(K, r) for r in rates]).cumprod(axis=1)


def test_cheap_steps_draft_long_blocks_expensive_steps_none():
    s = survival_of([0.8] * 4)
    full = np.full(4, K)
    cheap = plan(s, full, linear_cost(1.0, 1e-4), base_tokens=4, base_gain=4)
    # Worth it while 0.8^i >= MIN_GAIN and the token costs next to nothing.
    assert (cheap == int(np.log(MIN_GAIN) / np.log(0.8))).all(), cheap
    # A step that costs per token only (a saturated device): a guess accepted 90% of the
    # time cannot beat the sure token it rides beside.
    saturated = plan(s, full, linear_cost(0.0, 1.0), base_tokens=4, base_gain=4)
    assert (saturated == 0).all()
    # In between: some drafting, shorter than when cheap.
    middle = plan(s, full, linear_cost(1.0, 0.05), base_tokens=4, base_gain=4)
    assert 0 < middle.sum() < cheap.sum()


def test_poor_acceptance_drafts_nothing_good_acceptance_keeps_drafting():
    s = survival_of([0.02, 0.95, 0.5])
    got = plan(s, np.full(3, K), linear_cost(1.0, 1e-3), 3, 3)
    assert got[0] == 0
    assert got[1] > got[2] > 0


def test_a_fixed_cost_of_verifying_is_paid_only_once_worth_it():
    """Guesses switch on a verification pass that costs the same for one guess or many:
    one doubtful guess is not worth it, a few good ones are."""
    plain = 1.0

    def extra(m):
        return 0.5 + 0.001 * np.asarray(m)

    s = survival_of([0.3])
    assert plan_draft_lengths(s, np.full(1, K), plain, extra, 1)[0] == 0
    s = survival_of([0.9])
    assert plan_draft_lengths(s, np.full(1, K), plain, extra, 1)[0] > 4


def test_a_plan_goes_at_most_twice_past_the_most_guesses_measured():
    """Beyond the largest number of guesses measured, the cost curve is flat (an untried
    size looks cheap, to be tried); ``max_total`` bounds how far a plan reaches into it."""
    cost = StepCostModel(through_zero=True)
    assert cost.largest_measured() == 0.0
    for _ in range(3):
        cost.observe(8, 0.002)
    assert cost.largest_measured() == 8.0
    s = survival_of([0.9] * 8)
    plain = 0.01
    unbounded = plan_draft_lengths(s, np.full(8, K), plain, cost.predict, 8)
    assert unbounded.sum() > 64  # every usable guess: beyond 8 they look free
    bounded = plan_draft_lengths(s, np.full(8, K), plain, cost.predict, 8,
                                 max_total=int(2 * cost.largest_measured()))
    assert 0 < bounded.sum() <= 16


def test_rests_back_off_while_plans_send_nothing_and_a_lone_draft_steps_back_by_one():
    def run(plans: str, level: int = 0) -> tuple[int, list[int]]:
        """Plans in a row ('d': one that drafts, '.': one that does not) and the
        steps rested after each."""
        rests, last = [], "."
        for p in plans:
            level, rest = rest_after_plan(level, p == "d", again=last == "d")
            rests.append(rest)
            last = p
        return level, rests

    level, rests = run("........")
    assert rests == [1, 2, 4, 8, 16, 32, 32, 32] and max(rests) == MAX_REST
    # A lone drafting plan after long rests: no rest right after it (its guesses are being
    # verified), then the policy rests nearly as long as before, not 1, 2, 4 ... again.
    level, rests = run("d.", level)
    assert (level, rests) == (MAX_REST.bit_length(), [0, 32])
    level, rests = run("d.d.", level)
    assert rests == [0, 32, 0, 32]
    # Plans that draft step after step (requests are drafting) return to planning at
    # every step.
    assert run("dd...", level) == (3, [0, 0, 1, 2, 4])


def test_more_load_means_shorter_blocks():
    """The same requests and per-token cost: a bigger batch drafts fewer tokens per request."""
    cost = linear_cost(1.0, 0.01)
    per_request = []
    for batch in (1, 8, 64):
        s = survival_of([0.8] * batch)
        per_request.append(plan(s, np.full(batch, K), cost, batch, batch).mean())
    assert per_request[0] > per_request[1] > per_request[2] > 0


def test_plan_respects_max_len_and_is_the_best_total():
    s = survival_of([0.99, 0.99])
    cost = linear_cost(1.0, 0.02)
    got = plan(s, np.array([3, 0]), cost, 2, 2)
    assert got.tolist() == [3, 0]
    # Brute force over all lengths for a small case: the plan is optimal.
    s = survival_of([0.9, 0.6, 0.3])[:, :4]
    best = max(
        ((3 + sum(s[r, :d].sum() for r, d in enumerate(ds))) / cost(3 + sum(ds)), ds)
        for ds in np.ndindex(5, 5, 5)
    )
    got = plan(s, np.full(3, 4), cost, 3, 3, min_gain=0.0, min_speedup=1.0)
    value = (3 + sum(s[r, :d].sum() for r, d in enumerate(got))) / cost(3 + got.sum())
    assert value == pytest.approx(best[0])


def test_step_sizes_are_few_every_size_up_to_16_then_8_per_doubling():
    sizes = {int(step_size_at_most(n)) for n in range(1, 1089)}
    assert {n for n in sizes if n <= 16} == set(range(1, 17))
    assert sorted(n for n in sizes if 64 <= n <= 128) == list(range(64, 129, 8))
    assert len(sizes) < 70  # against 1,088 token counts a step of 64 x 17 tokens can run
    assert all(step_size_at_most(n) <= n < step_size_at_most(n) * 9 / 8 + 1
               for n in range(1, 1089))


def test_align_step_drops_the_least_likely_guesses_or_adds_the_likeliest():
    s = survival_of([0.9, 0.5, 0.8])
    full = np.full(3, K)
    # 40 requests (base tokens) + 5 guesses = 45: down to 44 (drop 1) beats up to 48.
    got = align_step(np.array([2, 2, 1]), s, full, 40, MIN_GAIN)
    assert got.tolist() == [2, 1, 1]  # row 1's second guess was the least likely (0.25)
    # 40 + 7 = 47: up to 48 adds one guess, where it is likeliest (row 0's third, 0.73).
    got = align_step(np.array([2, 3, 2]), s, full, 40, MIN_GAIN)
    assert got.tolist() == [3, 3, 2]
    # 41 + 1 = 42: dropping would send nothing; up to 44 adds the two likeliest.
    got = align_step(np.array([1, 0, 0]), s, full, 41, MIN_GAIN)
    assert got.tolist() == [2, 0, 1]
    # Nothing usable to add (max_len, or chances below MIN_GAIN): left as it is.
    got = align_step(np.array([1, 0, 0]), s, np.array([1, 0, 0]), 41, MIN_GAIN)
    assert got.tolist() == [1, 0, 0]
    # Aligned already, or no guess at all: unchanged.
    assert align_step(np.array([2, 1, 1]), s, full, 40, MIN_GAIN).tolist() == [2, 1, 1]
    assert align_step(np.zeros(3, np.int64), s, full, 41, MIN_GAIN).tolist() == [0, 0, 0]
    # Random plans land on an allowed size, within max_len.
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows = int(rng.integers(1, 65))
        s = np.cumprod(rng.uniform(0.5, 1.0, (rows, K)), axis=1)
        max_len = rng.integers(0, K + 1, rows)
        lengths = (max_len * rng.uniform(0, 1, rows)).astype(np.int64)
        base = int(rng.integers(rows, 2 * rows + 1))
        got = align_step(lengths.copy(), s, max_len, base, MIN_GAIN)
        assert (got >= 0).all() and (got <= max_len).all()
        if lengths.sum() and got.sum() != lengths.sum():
            assert step_size_at_most(base + got.sum()) == base + got.sum()


def test_step_cost_model_learns_a_curve_online():
    model = StepCostModel()
    assert (model.predict(np.array([1, 100])) == 1.0).all()  # nothing known: flat
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(1, 600))
        model.observe(n, 0.01 + 0.0001 * n + rng.normal(0, 1e-4))
    pred = model.predict(np.array([10, 100, 500]))
    np.testing.assert_allclose(pred, 0.01 + 0.0001 * np.array([10, 100, 500]), rtol=0.1)
    assert (np.diff(model.predict(np.arange(1, 2000))) >= 0).all()  # never cheaper with more
    # Beyond what was measured: no dearer than the largest size measured (optimistic).
    assert model.predict(np.array([5000]))[0] == model.predict(np.array([600]))[0]


def test_step_cost_model_forgets_a_stall_it_never_revisits():
    """One stalled step must not keep a size looking dear forever: the policy avoids it
    and so would never measure it again."""
    model = StepCostModel()
    for _ in range(20):
        model.observe(8, 0.010)
        model.observe(16, 0.010)
    model.observe(16, 0.500)  # a stall where the cost is known: counted at most SPIKE x
    assert model.predict(np.array([16]))[0] <= StepCostModel.SPIKE * 0.010
    model.observe(64, 0.500)  # a stall at a size never seen before: not believed yet
    assert model.predict(np.array([64]))[0] == pytest.approx(0.010, rel=0.1)
    model.observe(64, 0.500)  # seen twice: it is dear
    assert model.predict(np.array([64]))[0] == pytest.approx(0.5)
    for _ in range(500):  # not visited again: forgotten
        model.observe(8, 0.010)
    assert model.predict(np.array([16, 64])) == pytest.approx([0.010, 0.010], rel=0.1)


def test_step_cost_model_follows_a_change_of_load():
    model = StepCostModel()
    for _ in range(50):
        model.observe(64, 0.010)
    for _ in range(100):
        model.observe(64, 0.030)  # the machine got busier
    assert model.predict(np.array([64]))[0] == pytest.approx(0.030, rel=0.05)


def tails(tracker, slots):
    """Say that the rows' last guesses were Jacobi tails, whole."""
    n, k = len(slots), tracker.k
    tracker.remember(slots, np.zeros((n, k), dtype=np.int64), np.full(n, k), np.full(n, k),
                     np.full(n, TAIL), np.full(n, k))


def test_tracker_separates_requests_and_starts_new_ones_from_the_engine_average():
    tracker = AcceptanceTracker(k=4, capacity=2)
    slots = tracker.slots(["good", "bad"])
    tails(tracker, slots)
    for _ in range(30):
        tracker.observe(slots, tried=np.array([4, 1]), matched=np.array([4, 0]))
    good, bad = tracker.survival(slots)
    assert good[-1] > 0.8 and bad[0] < MIN_GAIN
    # A new request (slot recycled from "bad", which left) starts between the two.
    new_slots = tracker.slots(["good", "new"])
    assert len(tracker) == 2 and new_slots[0] == slots[0]
    new = tracker.survival(new_slots)[1]
    assert bad[0] < new[0] < good[0]


def test_a_request_without_evidence_returns_to_the_engine_estimate():
    tracker = AcceptanceTracker(k=2, capacity=4)
    slots = tracker.slots(["a", "b"])
    tails(tracker, slots)
    for _ in range(30):  # "a" fails, "b" (the rest of the engine) succeeds
        tracker.observe(slots, tried=np.array([1, 2]), matched=np.array([0, 2]))
    assert tracker.survival(slots)[0, 0] < MIN_GAIN
    for _ in range(80):  # "a" drafts nothing and has nothing to check
        tracker.observe(slots, tried=np.array([0, 2]), matched=np.array([0, 2]))
    # Back to the engine-wide rate at the first position (both requests' record).
    engine_rate = tracker.survival(tracker.slots(["a", "b", "new"]))[2, 0]
    assert tracker.survival(slots)[0, 0] == pytest.approx(engine_rate, abs=0.02)
    assert engine_rate > 0.3


def test_sources_are_judged_apart_position_by_position():
    """Tails that hold and fresh top-ups that fail: a guess with a long tail is worth
    drafting, the same guess made up afresh is not."""
    tracker = AcceptanceTracker(k=8, capacity=2)
    slots = tracker.slots(["r"])
    for _ in range(40):
        # Guesses of 4 tail tokens then 4 fresh ones: the tail holds, the first fresh fails.
        tracker.remember(slots, np.zeros((1, 8), dtype=np.int64), np.array([8]),
                         np.array([4]), np.array([TAIL]), np.array([8]))
        tracker.observe(slots, tried=np.array([5]), matched=np.array([4]))
    same = tracker.survival(slots, np.array([4]), np.array([TAIL]))[0]
    assert same[3] > 0.8 and same[4] < MIN_GAIN
    longer_tail = tracker.survival(slots, np.array([5]), np.array([TAIL]))[0]
    # A tail there: no record of failing, the prior's chance times the held tail's.
    assert longer_tail[4] == pytest.approx(OPTIMISM * longer_tail[3])
    copy = tracker.survival(slots, np.array([8]), np.array([COPY]))[0]
    assert copy[0] == pytest.approx(OPTIMISM)  # no copy evidence: the prior
    assert FRESH not in (TAIL, COPY)


def test_promises_are_scaled_by_how_they_turned_out_at_that_load():
    tracker = AcceptanceTracker(k=4, capacity=64)
    assert tracker.calibration(32) == 1.0
    for _ in range(50):  # at 32 requests, plans promise 10 accepted guesses and get 3
        tracker.promise(10.0, 32)
        tracker.deliver(3)
    assert tracker.calibration(32) == pytest.approx(0.3, abs=0.05)
    assert tracker.calibration(1) == 1.0  # another load keeps its own record
    for _ in range(200):  # plans at 32 that promise nothing: the record fades to trust
        tracker.promise(0.0, 32)
        tracker.deliver(0)
    assert tracker.calibration(32) > 0.9


def test_tracker_grows_past_its_capacity():
    tracker = AcceptanceTracker(k=2, capacity=1)
    slots = tracker.slots([f"r{i}" for i in range(5)])
    assert len(set(slots.tolist())) == 5


def test_verified_prefix_counts_sent_and_unsent_guesses():
    guess = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    guess_len = np.array([4, 4, 4, 0])
    # The exact tokens are read in place from a token buffer, from column ``first``.
    tokens = np.array([[1, 5, 6, 9, 0, 0], [2, 2, 5, 0, 0, 0], [5, 6, 7, 8, 1, 0],
                       [3, 5, 0, 0, 0, 0]], dtype=np.int32)
    first = np.array([1, 2, 0, 1])
    exact_len = np.array([3, 1, 5, 1])
    tried, matched = verified_prefix(guess, guess_len, tokens, first, exact_len)
    # Row 0: two accepted then a mismatch; row 1: nothing sent, the first guess held;
    # row 2: the whole guess held; row 3: no guess kept.
    assert matched.tolist() == [2, 1, 4, 0]
    assert tried.tolist() == [3, 1, 4, 0]
    # Near the end of the buffer only the tokens it holds are compared.
    tried, matched = verified_prefix(guess[2:3], guess_len[2:3], tokens[2:3],
                                     np.array([3]), np.array([5]))
    assert (matched.tolist(), tried.tolist()) == ([0], [1])


def test_score_checks_each_rows_last_guess_and_records_it():
    """One compiled call per step: the slots' remembered guesses against the tokens that
    end each row of the buffer, recorded as observe() would; nothing scored when stale."""
    tokens = np.array([[1, 5, 6, 9, 0, 0], [2, 2, 5, 0, 0, 0]], dtype=np.int32)
    num_tokens, num_new = np.array([4, 3]), np.array([3, 1])
    guesses = np.array([[5, 6, 7, 8], [5, 6, 7, 8]])
    trackers = [AcceptanceTracker(k=4, capacity=4) for _ in range(3)]
    for tracker in trackers:  # slots in another order than the rows
        tracker.slots(["x", "b", "a"])
        tracker.remember(np.array([2, 1]), guesses, np.array([4, 4]), np.array([4, 0]),
                         np.array([TAIL, COPY]), np.array([4, 0]))
    scored, by_hand, stale = trackers
    slots = np.array([2, 1])
    sent = scored.score(slots, tokens, num_tokens, num_new)
    assert sent.tolist() == [True, False]
    tried, matched = verified_prefix(guesses, np.array([4, 4]), tokens, num_tokens - num_new,
                                     num_new)
    assert (matched.tolist(), tried.tolist()) == ([2, 1], [3, 1])
    by_hand.observe(slots, tried, matched)
    assert scored.survival(slots) == pytest.approx(by_hand.survival(slots))
    stale.score(slots, tokens, num_tokens, num_new, stale=True)
    unchanged = AcceptanceTracker(k=4, capacity=4)
    assert stale.survival(slots) == pytest.approx(unchanged.survival(slots))


def run_epochs(chooser, rows, rates, epochs, plausible=True, tokens=None):
    """Drive ``chooser`` for ``epochs * EPOCH`` steps in which arm ``a`` makes
    ``rates[a]`` exact tokens per second (``tokens[a]`` per step, default 1); return the
    arm of each step. As in the engine, a step's tokens are known when it ends (before
    the next choice), its time only as the next step starts (after it). Arms missing from
    ``rates`` are never plausible."""
    arms, last = [], None
    for _ in range(epochs * BlockChooser.EPOCH):
        arm = chooser.choose(rows, lambda a: plausible and a in rates)
        arms.append(arm)
        if last is not None:
            chooser.took(last)
        made = 1.0 if tokens is None else tokens[arm]
        chooser.made(made)
        last = made / rates[arm]
    return arms


def test_block_chooser_keeps_the_faster_arm_and_rechecks_the_other_ever_less():
    chooser = BlockChooser()
    arms = run_epochs(chooser, rows=1, rates={PLAN: 100.0, FULL: 140.0}, epochs=40)
    assert arms[0] == PLAN and FULL in arms[: 2 * BlockChooser.EPOCH]  # both tried first
    assert arms[-BlockChooser.EPOCH:] == [FULL] * BlockChooser.EPOCH
    assert np.mean(np.array(arms[-20 * BlockChooser.EPOCH:]) == FULL) > 0.85

    # Where the plan is faster, the full block is tried at doubling intervals: it costs
    # ever less of the steps.
    chooser = BlockChooser()
    arms = np.array(run_epochs(chooser, rows=1, rates={PLAN: 100.0, FULL: 50.0}, epochs=200))
    early, late = arms[: 20 * BlockChooser.EPOCH], arms[-100 * BlockChooser.EPOCH:]
    assert 0 < np.mean(late == FULL) < np.mean(early == FULL)
    assert np.mean(late == FULL) <= 2 / BlockChooser.MAX_PATIENCE


def test_block_chooser_finds_the_best_of_three_arms_and_rechecks_the_others_in_turn():
    chooser = BlockChooser()
    rates = {PLAN: 100.0, FULL: 60.0, SHORT: 130.0}
    arms = np.array(run_epochs(chooser, rows=4, rates=rates, epochs=300))
    assert set(arms[: 3 * BlockChooser.EPOCH]) == {PLAN, FULL, SHORT}  # each tried first
    late = arms[-200 * BlockChooser.EPOCH:]
    assert np.mean(late == SHORT) > 0.95
    # The losers are re-checked, ever less often, each in its turn.
    assert 0 < np.mean(late == PLAN) <= 2 / BlockChooser.MAX_PATIENCE
    assert 0 < np.mean(late == FULL) <= 2 / BlockChooser.MAX_PATIENCE
    # When the traffic changes and a re-check finds a better arm, it takes over.
    arms = run_epochs(chooser, rows=4, rates={PLAN: 100.0, FULL: 300.0, SHORT: 130.0},
                      epochs=200)
    assert arms[-BlockChooser.EPOCH:] == [FULL] * BlockChooser.EPOCH


def test_block_chooser_tries_nothing_implausible_and_learns_per_load():
    chooser = BlockChooser()
    assert set(run_epochs(chooser, 64, {PLAN: 100.0, FULL: 500.0}, 10, plausible=False)) \
        == {PLAN}
    # What was learnt at batch 1 does not carry over to 32 requests, and back.
    run_epochs(chooser, 1, {PLAN: 100.0, FULL: 200.0}, 10)
    assert run_epochs(chooser, 32, {PLAN: 100.0, FULL: 20.0}, 30)[-1] == PLAN
    assert run_epochs(chooser, 1, {PLAN: 100.0, FULL: 200.0}, 1)[-1] == FULL


def test_block_chooser_times_each_arm_by_its_own_steps():
    # A step's time arrives after the next choice. Credited as it comes, an epoch of the
    # dear full block would take the cheap plan step before it (1 + 15 * 1.65 s for 25.6
    # tokens: 0.99/s) and the plan's epoch after it a full-block step (1.65 + 15 s for
    # 16: 0.96/s), and the full block would win at 0.97 tokens/s against the plan's 1.
    chooser = BlockChooser()
    arms = np.array(run_epochs(chooser, rows=1, rates={PLAN: 1.0, FULL: 1.6 / 1.65},
                               tokens={PLAN: 1.0, FULL: 1.6}, epochs=60))
    assert np.mean(arms[len(arms) // 2:] == PLAN) > 0.9


def test_expected_rate_counts_sent_guesses_and_their_cost():
    survival = survival_of([0.5, 1.0])
    lengths = np.array([2, 1])
    # 2 base tokens + (0.5 + 0.25) + 1.0, in 1 s + 3 guesses x 0.1 s.
    rate = expected_rate(survival, lengths, 1.0, lambda m: 0.1 * m, base_gain=2.0)
    assert rate == pytest.approx(3.75 / 1.3)
    assert expected_rate(survival, np.zeros(2), 1.0, lambda m: 0.1 * m, 2.0) == 2.0


def test_cautious_prediction_grows_beyond_what_was_measured():
    model = StepCostModel(through_zero=True)
    for _ in range(3):
        model.observe(4, 0.001)
        model.observe(8, 0.002)
    assert model.predict_one(64) == pytest.approx(0.002)  # optimistic: flat
    assert model.predict_in_proportion(64) == pytest.approx(0.016)  # cautious
    assert model.predict_in_proportion(6) == pytest.approx(model.predict_one(6))


def test_step_cost_model_forgets_what_it_no_longer_observes():
    """A cost believed too high stops the guesses that would correct it: it must fade
    with the steps that pass without it, and be measured again."""
    model = StepCostModel(through_zero=True)
    model.observe(16, 0.5)
    model.observe(16, 0.5)
    assert model.knows(16) and model.predict_one(16) == pytest.approx(0.5)
    for _ in range(1000):
        model.age()
    assert not model.knows(16) and model.num_observed_bins == 0
