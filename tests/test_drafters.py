"""Baseline drafters (Medusa, EAGLE, EAGLE-3) as torch code: the math, the export format and
training through the shared loop. vLLM loading and acceptance: ``test_baselines.py``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cllm_vllm.training import drafters
from cllm_vllm.training.drafters import (
    TeacherFeatures,
    build_drafter,
    chain_attention_mask,
    default_aux_layers,
    shifted_token_loss,
)
from cllm_vllm.training.trajectories import teacher_outputs


def test_chain_mask_sees_the_cached_prefix_and_its_own_chain():
    # Step 0 is plain causal attention.
    assert torch.equal(chain_attention_mask(4, 0), torch.ones(4, 4).tril().bool())
    # Step 2 at position 3: the chain began after prefix position 1, so it sees step-0
    # keys 0..1, its step-1 key at 2 and its own step-2 key at 3.
    m = chain_attention_mask(5, 2)
    assert m.shape == (5, 15)
    row = m[3]
    assert row[:5].tolist() == [True, True, False, False, False]
    assert row[5:10].tolist() == [False, False, True, False, False]
    assert row[10:].tolist() == [False, False, False, True, False]
    # Every query sees at least its own key (no all-masked softmax row).
    assert m.any(-1).all()


def test_shifted_token_loss_scores_the_token_shift_positions_ahead():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    logits = torch.full((1, 3, 12), -10.0)
    logits[0, 0, 7] = logits[0, 1, 8] = 10.0  # right for ids[2], ids[3]
    logits[0, 2, 3] = 10.0  # wrong for ids[4]
    loss, acc = shifted_token_loss(logits, ids, mask, 2)
    assert acc.item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(20.0 / 3, rel=1e-3)
    # Masked targets do not count.
    _, acc = shifted_token_loss(logits, ids, torch.tensor([[0, 0, 1, 1, 0]]), 2)
    assert acc.item() == 1.0


def test_aux_layers_are_distinct_and_below_the_post_norm_output():
    assert default_aux_layers(4) == (1, 2, 3)
    assert default_aux_layers(32) == (1, 16, 31)
    assert default_aux_layers(2) == (1,)


def test_teacher_outputs_are_the_fixed_points_up_to_eos():
    recs = [{"prompt": [1, 2], "blocks": [[[0, 0, 0], [3, 4, 5]], [[6, 2, 9]]]},
            {"prompt": [7], "blocks": [[[8, 8, 8]]]}]
    assert teacher_outputs(recs, eos_ids=[2]) == [([1, 2], [3, 4, 5, 6, 2]), ([7], [8, 8, 8])]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from cllm_vllm.training.tiny import build_tiny_model, synthetic_text, train_tokenizer

    root = tmp_path_factory.mktemp("drafters")
    tok = train_tokenizer(synthetic_text(500), 300, root / "tok")
    build_tiny_model(root / "teacher", tok, "llama", hidden_size=64, num_layers=4,
                     num_heads=2, num_kv_heads=1, initializer_range=0.1, seed=3)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(root / "teacher"), dtype=torch.float32)


# The tensors vLLM 0.32's loaders read (model_executor/models/medusa.py, llama_eagle.py,
# llama_eagle3.py) for hidden size H, MLP width M, V tokens, q/kv width Q/KV. A name
# outside this set would be dropped by the loader; a missing one left random.
def expected_tensors(kind, h, m, v, q, kv, heads=4, aux=3):
    if kind == "medusa":
        return {**{f"blocks.{i}.layers.0.weight": (h, h) for i in range(heads)},
                **{f"lm_heads.{i}.weight": (v, h) for i in range(heads)}}
    width = 2 * h
    layer = {"layers.0.self_attn.q_proj.weight": (q, width),
             "layers.0.self_attn.k_proj.weight": (kv, width),
             "layers.0.self_attn.v_proj.weight": (kv, width),
             "layers.0.self_attn.o_proj.weight": (h, q),
             "layers.0.post_attention_layernorm.weight": (h,),
             "layers.0.mlp.gate_proj.weight": (m, h), "layers.0.mlp.up_proj.weight": (m, h),
             "layers.0.mlp.down_proj.weight": (h, m)}
    if kind == "eagle":  # attention reads fc's H-wide output; no input norm, no head
        layer = {k: (s[0], h) if "_proj" in k and "o_proj" not in k and "mlp" not in k
                 else s for k, s in layer.items()}
        return {"fc.weight": (h, 2 * h), **layer}
    return {"fc.weight": (h, aux * h), **layer, "layers.0.hidden_norm.weight": (h,),
            "layers.0.input_layernorm.weight": (h,), "norm.weight": (h,),
            "lm_head.weight": (v, h)}


@pytest.mark.parametrize("kind", drafters.KINDS)
def test_export_holds_exactly_the_tensors_vllm_loads(teacher, kind, tmp_path):
    cfg = teacher.config
    d = build_drafter(kind, teacher)
    d.save_pretrained(tmp_path)
    saved = {k: tuple(t.shape) for k, t in load_file(str(tmp_path / "model.safetensors")).items()}
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    assert saved == expected_tensors(kind, cfg.hidden_size, cfg.intermediate_size,
                                     cfg.vocab_size, q, kv)
    config = json.loads((tmp_path / "config.json").read_text())
    if kind == "medusa":
        assert config["architectures"] == ["MedusaModel"] and config["num_heads"] == 4
        assert config["num_hidden_layers"] == 1
    else:
        assert config["num_hidden_layers"] == 1 and config["model_type"] == "llama"
    if kind == "eagle3":
        assert config["architectures"] == ["Eagle3LlamaForCausalLM"]
        assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
        assert config["draft_vocab_size"] == cfg.vocab_size


def test_medusa_starts_as_the_teachers_head_and_eagle3_reads_residual_taps(teacher):
    ids = torch.randint(3, 300, (2, 12))
    feats = TeacherFeatures(teacher, ids, torch.ones_like(ids), (1, 2, 3))
    m = build_drafter("medusa", teacher)
    # Identity blocks and copied heads: every head first predicts what the teacher does.
    head0 = m.lm_heads[0](m.blocks[0](feats.final))
    assert torch.allclose(head0, teacher(input_ids=ids).logits, atol=1e-4)
    # HF hidden_states[i], i < L, is the residual stream after layer i (vLLM's tap i).
    h = teacher.model.embed_tokens(ids)
    pos = torch.arange(12)[None]
    rot = teacher.model.rotary_emb(h, pos)
    for layer in teacher.model.layers[:3]:
        h = layer(h, position_embeddings=rot, attention_mask=None, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
    assert torch.allclose(feats.aux[..., -h.shape[-1]:], h, atol=1e-4)


def test_eagle3_refuses_the_post_norm_output_as_a_tap(teacher):
    with pytest.raises(ValueError, match=r"1\.\.3"):
        build_drafter("eagle3", teacher, aux_layers=(1, 2, 4))


@pytest.mark.parametrize("kind", drafters.KINDS)
def test_training_lowers_the_loss_and_resumes_from_vllm_format_checkpoints(teacher, kind,
                                                                           tmp_path):
    """A few steps on the teacher's own greedy outputs: the drafter learns them, and a
    killed run resumes from checkpoints written in the export format."""
    from cllm_vllm.training.objectives import DrafterObjective
    from cllm_vllm.training.trainer import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 12, (24,), generator=g)]
    pairs = []
    with torch.no_grad():
        for p in prompts:
            out = teacher.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                   pad_token_id=0)[0, len(p):].tolist()
            pairs.append((p, out))
    objective = DrafterObjective(pairs, teacher, pad_id=0)

    class Crash(RuntimeError):
        pass

    class CrashingObjective(DrafterObjective):
        """Dies while collating the batch of step ``crash_at``, as a killed run would."""

        calls = 0

        def collate(self, samples):
            self.calls += 1
            if self.calls == 13:
                raise Crash
            return super().collate(samples)

    def run(out, obj):
        torch.manual_seed(0)
        d = build_drafter(kind, teacher)
        cfg = TrainConfig(out_dir=str(out), steps=20, batch_size=8, lr=1e-2, save_every=5,
                          resume=True, progress=False)
        return train(d, None, obj, cfg)

    log = run(tmp_path / "a", objective)
    assert log[-1]["loss"] < 0.85 * log[0]["loss"]
    crashing = CrashingObjective(pairs, teacher, pad_id=0)
    with pytest.raises(Crash):
        run(tmp_path / "b", crashing)
    ck = tmp_path / "b" / "checkpoint-10"
    assert (ck / "config.json").exists() and not (tmp_path / "b" / "model.safetensors").exists()
    run(tmp_path / "b", objective)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
