"""The CLLM objective against the losses computed directly from separate forward passes."""

from __future__ import annotations

import random

import pytest
import torch

from cllm_vllm.training.losses import ar_loss, consistency_loss, unconverged_mask
from cllm_vllm.training.objectives import BlockSample, CLLMObjective, LMObjective


@pytest.fixture(scope="module")
def model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _blocks():
    return [
        BlockSample(prompt=[1, 5, 6, 7], prefix_output=[8, 9, 10, 11],
                    states=[[3, 3, 3, 3], [12, 4, 4, 4], [12, 13, 14, 15]], answer=[8, 9, 2]),
        BlockSample(prompt=[1, 20], prefix_output=[],
                    states=[[21, 5, 5, 5], [21, 22, 23, 24]], answer=[21, 2]),
    ]


def _direct(model, b: BlockSample, j: int, goal: list[int]):
    """GC loss of one sample from two separate, unpadded forward passes."""
    prefix = b.prompt + b.prefix_output
    n = len(goal)
    with torch.no_grad():
        t = model(torch.tensor([prefix + goal])).logits[0, len(prefix) - 1: len(prefix) - 1 + n]
    s = model(torch.tensor([prefix + b.states[j]])).logits[0, len(prefix) - 1:
                                                           len(prefix) - 1 + n]
    mask = unconverged_mask(torch.tensor(b.states[j]), torch.tensor(goal))
    return consistency_loss(s[None], t[None], mask[None])[0]


def test_gc_loss_matches_separate_forward_passes(model):
    blocks = _blocks()
    obj = CLLMObjective(blocks, pad_id=0, consistency="global", ar_weight=0.0)
    samples = [(0, random.Random(1)), (1, random.Random(2))]
    js = [random.Random(1).randrange(2), random.Random(2).randrange(1)]
    parts = obj.losses(model, obj.collate(samples))
    for k, (b, j) in enumerate(zip(blocks, js, strict=True)):
        want = _direct(model, b, j, b.states[-1])
        assert parts["consistency"][k].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


def test_ar_loss_on_prefix_and_fixed_point(model):
    b = _blocks()[0]
    obj = CLLMObjective([b], pad_id=0, ar_weight=1.0)
    parts = obj.losses(model, obj.collate([(0, random.Random(0))]))
    seq = torch.tensor([b.prompt + b.prefix_output + b.states[-1]])
    logits = model(seq).logits[:, :-1]
    mask = torch.zeros_like(seq[:, 1:])
    mask[:, len(b.prompt) - 1:] = 1  # the output tokens, not the prompt
    want = ar_loss(logits, seq[:, 1:], mask)
    assert parts["ar"][0].item() == pytest.approx(want.item(), rel=1e-5)


def test_ground_truth_ar_covers_the_answer_up_to_the_block_end(model):
    # A 12-token reference answer; the block ends at answer position 2 + 4 = 6.
    answer = [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 30, 2]
    b = BlockSample(prompt=[1, 5, 6], prefix_output=[8, 9],
                    states=[[3, 3, 3, 3], [12, 13, 14, 15]], answer=answer)
    obj = CLLMObjective([b], pad_id=0, ar_weight=1.0, ar_labels="ground-truth")
    batch = obj.collate([(0, random.Random(0))])
    assert batch["input_ids"].shape[1] == len(b.prompt) + 6  # not the whole answer
    parts = obj.losses(model, batch)
    seq = torch.tensor([b.prompt + answer[:6]])
    mask = torch.zeros_like(seq[:, 1:])
    mask[:, len(b.prompt) - 1:] = 1
    want = ar_loss(model(seq).logits[:, :-1], seq[:, 1:], mask)
    assert parts["ar"][0].item() == pytest.approx(want.item(), rel=1e-5)


def test_replay_adds_ar_on_one_drawn_pair_per_sample(model):
    replay = [([1, 33, 34], [35, 36, 2]), ([1, 37], [38, 39, 30, 2])]
    b = _blocks()[0]
    plain = CLLMObjective([b], pad_id=0, ar_weight=1.0)
    obj = CLLMObjective([b], pad_id=0, ar_weight=1.0, replay=replay, replay_weight=3.0)
    rng = random.Random(4)
    rng.randrange(len(b.states) - 1)  # the state draw comes first
    prompt, answer = replay[rng.randrange(len(replay))]
    parts = obj.losses(model, obj.collate([(0, random.Random(4))]))
    base = plain.losses(model, plain.collate([(0, random.Random(4))]))
    seq = torch.tensor([prompt + answer])
    mask = torch.zeros_like(seq[:, 1:])
    mask[:, len(prompt) - 1:] = 1
    want = ar_loss(model(seq).logits[:, :-1], seq[:, 1:], mask)
    assert parts["replay"][0].item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["ar"][0].item() == pytest.approx(base["ar"][0].item(), rel=1e-5)
    assert parts["loss"][0].item() == pytest.approx(
        base["loss"][0].item() + 3.0 * want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="replay"):
        CLLMObjective([b], pad_id=0, replay_weight=1.0)
    # A replay pair longer than the batch's trajectory rows is cut to their width.
    long = CLLMObjective([b], pad_id=0, replay=[([1, 33], [34] * 30 + [2])],
                         replay_weight=1.0)
    batch = long.collate([(0, random.Random(4))])
    assert batch["input_ids"].shape[1] == plain.collate([(0, random.Random(4))])[
        "input_ids"].shape[1]
    assert long.losses(model, batch)["replay"][0].item() > 0


def test_positions_after_eos_do_not_count(model):
    eos = 2
    base = BlockSample(prompt=[1, 5, 6], prefix_output=[], states=[[7, 7, 7, 7],
                       [9, eos, 30, 31]], valid_len=2)
    other = BlockSample(prompt=[1, 5, 6], prefix_output=[], states=[[7, 7, 7, 17],
                        [9, eos, 35, 36]], valid_len=2)
    losses = []
    for b in (base, other):
        obj = CLLMObjective([b], pad_id=0)
        losses.append(obj.losses(model, obj.collate([(0, random.Random(0))])))
    for key in ("consistency", "ar"):
        assert losses[0][key].item() == pytest.approx(losses[1][key].item(), rel=1e-6)


def test_padding_does_not_change_per_sample_losses(model):
    blocks = _blocks()
    obj = CLLMObjective(blocks, pad_id=0, consistency="local", ar_labels="ground-truth")
    together = obj.losses(model, obj.collate([(0, random.Random(5)), (1, random.Random(6))]))
    alone = obj.losses(model, obj.collate([(1, random.Random(6))]))
    for key in ("consistency", "ar", "loss"):
        assert together[key][1].item() == pytest.approx(alone[key][0].item(), rel=1e-4)


def test_lm_objective_groups_by_length_within_budget():
    pairs = [([1] * (3 + i % 7), [2] * (i % 50 + 1)) for i in range(200)]
    obj = LMObjective(pairs, pad_id=0, batch_tokens=256)
    seen = sorted(i for g in obj.groups for i in g)
    assert seen == list(range(200))
    for g in obj.groups:
        width = max(len(obj.pairs[i][0]) + len(obj.pairs[i][1]) for i in g)
        assert width * len(g) <= 256 or len(g) == 1


def test_length_buckets_mix_kinds_of_samples_within_budget():
    # Two "templates" of lengths 40 and 41: exact-length groups hold one kind each,
    # 64-token buckets mix them (the teacher learned to copy numbers only with mixing).
    pairs = [([1] * 10, [2 + i % 2] * (30 + i % 2)) for i in range(120)]

    def kinds(obj, group):
        return {obj.pairs[i][1][0] for i in group}

    exact = LMObjective(pairs, pad_id=0, batch_tokens=400)
    assert all(len(kinds(exact, g)) == 1 for g in exact.groups)
    mixed = LMObjective(pairs, pad_id=0, batch_tokens=400, length_bucket=64)
    assert sum(len(kinds(mixed, g)) == 2 for g in mixed.groups) >= len(mixed.groups) - 1
    assert sorted(i for g in mixed.groups for i in g) == list(range(120))
    for g in mixed.groups:
        assert len(g) * max(len(p) + len(a) for p, a in (mixed.pairs[i] for i in g)) <= 400


def test_bad_objective_options_are_named():
    with pytest.raises(ValueError, match="consistency must be"):
        CLLMObjective(_blocks(), 0, consistency="both")
    no_answer = [BlockSample(prompt=[1], prefix_output=[], states=[[3], [4]])]
    with pytest.raises(ValueError, match="needs an answer"):
        CLLMObjective(no_answer, 0, ar_labels="ground-truth")
