"""The bundled Medusa, EAGLE and EAGLE-3 drafters in vLLM: loaded whole, exact, and real.

vLLM's drafter loaders drop tensor names they do not know and never report missing ones,
so a wrongly named tensor would stay randomly initialised and only acceptance would tell.
Here every parameter of the drafter vLLM built is compared with the shipped tensors (or,
for what a drafter shares, with the teacher's), and the teacher with each drafter must
give AR's greedy output with real acceptance on held-out prompts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import engine
from safetensors.torch import load_file

from cllm_vllm.evaluation import BUNDLED_TEACHER, DRAFTER_K, BUNDLED_DRAFTERS, drafter_spec

pytestmark = pytest.mark.engine

# Tensors vLLM stacks into one parameter: HF name part -> (vLLM part, order in the stack).
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
MIN_TOKENS_PER_STEP = 1.3


def vllm_name(kind: str, name: str) -> tuple[str, int | None]:
    """Where vLLM 0.32 loads a shipped tensor: its parameter name and stack position."""
    if kind == "medusa":
        return name, None
    if not name.startswith("lm_head"):
        name = "model." + name
    for part, (stacked, pos) in STACKED.items():
        if f".{part}." in name:
            return name.replace(part, stacked), pos
    return name, None


def _parameters(wrapper):
    """The drafter's and the target's parameters as vLLM holds them. vLLM's CPU backend
    repacks linear weights for oneDNN (the parameter left empty); for those the layer's
    output on the identity matrix, W^T, stands in for the weight."""
    runner = wrapper.worker.model_runner

    def weights(model):
        out = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.numel() == 0:
                eye = torch.eye(mod.input_size, dtype=torch.float32)
                with torch.no_grad():
                    y = mod(eye)
                out[name + ".weight"] = (y[0] if isinstance(y, tuple) else y).T.contiguous()
        return out

    return weights(runner.drafter.model), weights(runner.model)


@pytest.fixture(scope="module")
def engines():
    with engine(BUNDLED_TEACHER, max_model_len=1024, max_num_seqs=16) as ar:
        out = {"ar": ar}
        for kind, path in BUNDLED_DRAFTERS.items():
            with engine(BUNDLED_TEACHER, max_model_len=1024, max_num_seqs=16,
                        speculative_config=drafter_spec(kind, path, DRAFTER_K[kind]),
                        per_request_spec_decode_metrics="summary") as llm:
                out[kind] = llm
        yield out


@pytest.mark.parametrize("kind", list(BUNDLED_DRAFTERS))
def test_vllm_loads_every_shipped_tensor_and_nothing_stays_random(engines, kind):
    drafter, target = engines[kind].collective_rpc(_parameters)[0]
    shipped = load_file(str(BUNDLED_DRAFTERS[kind] / "model.safetensors"))
    stacks: dict[str, list] = {}
    for name, tensor in shipped.items():
        dest, pos = vllm_name(kind, name)
        assert dest in drafter, f"vLLM has no parameter for {name} (would be dropped)"
        if pos is None:
            torch.testing.assert_close(drafter[dest], tensor, rtol=0, atol=1e-6)
        else:
            stacks.setdefault(dest, []).append((pos, tensor))
    for dest, parts in stacks.items():
        whole = torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])])
        torch.testing.assert_close(drafter[dest], whole, rtol=0, atol=1e-6)
    loaded = {vllm_name(kind, n)[0] for n in shipped}
    # What the drafter does not ship it shares with the teacher (EAGLE's embedding and
    # EAGLE-1's head): those must be the teacher's own weights, not random ones.
    for name, param in drafter.items():
        if name in loaded:
            continue
        twin = {"model.embed_tokens.weight": "model.embed_tokens.weight",
                "lm_head.weight": "lm_head.weight"}.get(name)
        assert twin is not None, f"{kind}: vLLM parameter {name} was never loaded"
        source = target.get(twin, target["model.embed_tokens.weight"])  # tied teacher
        torch.testing.assert_close(param, source, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(BUNDLED_DRAFTERS))
def test_drafters_give_ars_output_with_real_acceptance(engines, kind):
    from transformers import AutoTokenizer

    from cllm_vllm.evaluation import MAX_TOKENS, heldout_records, run_batches
    from cllm_vllm.stats import batch_acceptance
    from cllm_vllm.training.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TEACHER))
    for domain, n in (("arithmetic", 24), ("sharegpt", 8)):
        prompts = [encode_prompt(tok, r["messages"]) for r in heldout_records(domain, n)]
        want, _ = run_batches(engines["ar"], prompts, MAX_TOKENS[domain], 8)
        got, _ = run_batches(engines[kind], prompts, MAX_TOKENS[domain], 8)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        if domain == "arithmetic":
            tps = batch_acceptance(got).tokens_per_step
            assert tps > MIN_TOKENS_PER_STEP, f"{kind}: {tps:.2f} tokens per step"
