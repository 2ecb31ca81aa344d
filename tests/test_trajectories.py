"""Trajectory collection: fixed points are AR greedy output, states are Jacobi steps, resume.

Runs on a tiny random-weight model with HF transformers only (no vLLM).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm_vllm.jacobi import jacobi_step
from cllm_vllm.training.trajectories import CollectConfig, collect, is_loop, load

BLOCK = 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from cllm_vllm.training.tiny import build_tiny_model, synthetic_text, train_tokenizer

    root = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer(synthetic_text(2000), 512, root / "tok")
    build_tiny_model(root / "model", tok, hidden_size=64, num_heads=2,
                     initializer_range=0.1, seed=3)
    return root / "model"


def _records(n: int, seed: int = 0) -> list[dict]:
    from cllm_vllm.training.tiny import synthetic_text

    lines = synthetic_text(n * 3, seed)
    # prompts of very different lengths, so batches are left-padded
    return [{"messages": [{"role": "user", "content": " ".join(lines[i: i + 1 + i % 3])}],
             "answer": lines[-1 - i]} for i in range(n)]


@pytest.fixture(scope="module")
def collected(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("traj")
    cfg = CollectConfig(block_size=BLOCK, max_new_tokens=40, batch_size=5, shard_size=6)
    collect(teacher, _records(14), out, cfg, progress=False)
    return out


def _model(teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()


def test_fixed_points_are_the_teachers_greedy_output(teacher, collected):
    model = _model(teacher)
    manifest, records = load(collected, BLOCK)
    assert manifest["num_prompts"] == len(records) == 14
    assert sorted(r["id"] for r in records) == list(range(14))
    total_blocks = 0
    for rec in records:
        out = [t for states in rec["blocks"] for t in states[-1]]
        total_blocks += len(rec["blocks"])
        with torch.no_grad():
            ref = model.generate(torch.tensor([rec["prompt"]]), max_new_tokens=max(1, len(out)),
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out == ref[0, len(rec["prompt"]):].tolist()[: len(out)], rec["id"]
    assert total_blocks >= 14  # not everything was cleaned away


def test_every_state_is_one_jacobi_step_from_the_previous(teacher, collected):
    model = _model(teacher)
    _, records = load(collected, BLOCK)
    checked = 0
    for rec in records[:6]:
        prefix = list(rec["prompt"])
        for states in rec["blocks"]:
            assert len(states) >= 1
            for i, state in enumerate(states):
                # the model's greedy prediction at every block position, without a cache
                with torch.no_grad():
                    logits = model(torch.tensor([prefix + state])).logits[0]
                target = logits[len(prefix) - 1:].argmax(-1).numpy()
                step = jacobi_step(np.array(state), target)
                if i + 1 < len(states):
                    nxt = np.concatenate([step.exact, step.tail])[:BLOCK]
                    assert nxt.tolist() == states[i + 1]
                    checked += 1
                else:
                    assert step.num_accepted == BLOCK  # the last state is a fixed point
            prefix += states[-1]
    assert checked > 20


def test_manifest_and_shards_follow_the_schema(collected):
    manifest = json.loads((collected / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["block_size"] == BLOCK
    assert sorted(manifest["shards"]) == ["shard-00000.jsonl", "shard-00001.jsonl",
                                          "shard-00002.jsonl"]
    lines = (collected / "shard-00001.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == list(range(6, 12))
    rec = json.loads(lines[0])
    assert set(rec) == {"id", "prompt", "answer", "blocks", "eos"}
    assert rec["answer"][-1] == 2  # ground-truth answer ends with EOS


def test_cleaning_drops_loops():
    assert is_loop([7] * 8, 2)
    assert is_loop([1, 2] * 4, 2)
    assert not is_loop([1, 2, 3] * 3, 2)
    assert not is_loop([1, 2, 3, 4, 5, 6, 7, 8], 2)


def test_a_pad_token_past_the_models_vocabulary_is_never_fed_to_it(teacher, collected,
                                                                   tmp_path):
    """Some tokenizers add a pad token at id = vocab size (Qwen2's do); padded positions
    are masked, so collection pads with an id the model has and gets the same
    trajectories."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "pad-past-vocab"
    shutil.copytree(teacher, model_dir)
    tok = AutoTokenizer.from_pretrained(str(teacher))
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.save_pretrained(model_dir)
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    assert tok.pad_token_id >= vocab
    out = tmp_path / "traj"
    cfg = CollectConfig(block_size=BLOCK, max_new_tokens=40, batch_size=5, shard_size=6)
    collect(model_dir, _records(14), out, cfg, progress=False)
    shards = sorted(p.name for p in collected.glob("shard-*.jsonl"))
    assert shards and shards == sorted(p.name for p in out.glob("shard-*.jsonl"))
    for name in shards:
        assert (out / name).read_bytes() == (collected / name).read_bytes(), name


def test_collect_refuses_a_tokenizer_larger_than_the_model_before_loading_it(teacher,
                                                                            tmp_path):
    from cllm_vllm.cli import main
    from cllm_vllm.training.tiny import synthetic_text, train_tokenizer

    model_dir = tmp_path / "bigger-tokenizer"
    shutil.copytree(teacher, model_dir)
    train_tokenizer(synthetic_text(2000, seed=9), 700, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not loaded")  # would fail if it were
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(_records(1)[0]) + "\n")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["collect", "--teacher", str(model_dir), "--prompts", str(prompts),
                   "--out", str(tmp_path / "out")])
    assert rc == 2, err.getvalue()
    assert str(model_dir) in err.getvalue() and "more than the model's vocabulary (512)" \
        in err.getvalue()
    assert not (tmp_path / "out").exists()


def _collect_cmd(teacher, prompts, out):
    return [sys.executable, "-m", "cllm_vllm.cli", "collect", "--teacher", str(teacher),
            "--prompts", str(prompts), "--out", str(out), "--block-size", str(BLOCK),
            "--max-new-tokens", "48", "--batch-size", "2", "--shard-size", "2"]


def test_killed_collection_resumes_to_the_same_shards(teacher, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _records(12, seed=4)))
    env = dict(os.environ, TQDM_DISABLE="1")
    whole = tmp_path / "whole"
    subprocess.run(_collect_cmd(teacher, prompts, whole), check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_collect_cmd(teacher, prompts, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "shard-00001.jsonl").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(p.name for p in killed.glob("shard-*.jsonl"))
    assert 2 <= len(shards) < 6, "the kill should land mid-run"
    subprocess.run(_collect_cmd(teacher, prompts, killed), check=True, env=env,
                   capture_output=True)
    for name in sorted(p.name for p in whole.glob("shard-*.jsonl")):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    m1 = json.loads((whole / "manifest.json").read_text())
    m2 = json.loads((killed / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"] and len(m1["shards"]) == 6
    assert not list(killed.glob("*.tmp"))


def _train(argv) -> tuple[int, str]:
    import contextlib
    import io

    from cllm_vllm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", *argv])
    return rc, err.getvalue()


def test_bad_training_input_fails_before_training(teacher, collected, tmp_path):
    out = tmp_path / "out"
    base = ["--model", str(teacher), "--out", str(out), "--steps", "1", "--no-progress"]
    rc, err = _train(base + ["--data", str(tmp_path / "nowhere")])
    assert rc == 2 and "no manifest.json" in err
    rc, err = _train(base + ["--data", str(collected), "--block-size", "16"])
    assert rc == 2 and "block size 8" in err and "16" in err
    broken = tmp_path / "broken"
    shutil.copytree(collected, broken)
    (broken / "shard-00001.jsonl").write_text('{"id": 6, "prompt": [1, 2], "blocks": [[[1')
    rc, err = _train(base + ["--data", str(broken)])
    assert rc == 2 and "shard-00001.jsonl:1: malformed record" in err
    (broken / "shard-00001.jsonl").unlink()
    rc, err = _train(base + ["--data", str(broken)])
    assert rc == 2 and "shard-00001.jsonl is missing" in err
    # a model directory whose tokenizer is not the one the data was collected with, and
    # one whose tokenizer has more tokens than the model's vocabulary (not the model's own)
    from cllm_vllm.training.tiny import synthetic_text, train_tokenizer

    for name, lines, vocab, message in (
            ("other", 500, 512, "another tokenizer"),
            ("bigger", 2000, 700, "more than the model's vocabulary (512)")):
        model_dir = tmp_path / f"{name}-tokenizer"
        shutil.copytree(teacher, model_dir)
        train_tokenizer(synthetic_text(lines, seed=9), vocab, model_dir)
        rc, err = _train(["--model", str(model_dir), "--data", str(collected), "--out",
                          str(out), "--steps", "1"])
        assert rc == 2 and message in err, name
    rc, err = _train(base + ["--data", str(collected), "--ar-weight", "-1"])
    assert rc == 2 and "--ar-weight" in err
    no_answers = tmp_path / "prompts.jsonl"
    no_answers.write_text('{"prompt": "a question"}\n')
    rc, err = _train(base + ["--data", str(collected), "--replay", str(no_answers)])
    assert rc == 2 and "prompts.jsonl" in err and "no answer" in err
    rc, err = _train(base + ["--data", str(collected), "--replay-weight", "3"])
    assert rc == 2 and "--replay-weight needs --replay" in err
    assert not out.exists()  # nothing was trained or written


def test_train_with_replay_logs_its_loss(teacher, collected, tmp_path):
    from cllm_vllm.training.data import write_jsonl

    replay = tmp_path / "replay.jsonl"
    write_jsonl(replay, _records(5, seed=4))
    out = tmp_path / "out"
    rc, err = _train(["--model", str(teacher), "--data", str(collected), "--out", str(out),
                      "--steps", "2", "--no-progress", "--replay", str(replay),
                      "--replay-weight", "2"])
    assert rc == 0, err
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(x["replay"] > 0 for x in log)
    assert json.loads((out / "train_config.json").read_text())["extra"]["replay_weight"] == 2


def test_bad_prompt_files_are_named(teacher, tmp_path):
    import contextlib
    import io

    from cllm_vllm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["collect", "--teacher", str(teacher), "--prompts", str(bad),
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.jsonl:2" in err.getvalue()
    with contextlib.redirect_stderr(err):
        rc = main(["collect", "--teacher", str(tmp_path), "--prompts", str(bad),
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "not an HF model directory" in err.getvalue()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER_ONLY = ("{% for m in messages %}{% if m['role'] != 'user' %}"
             "{{ raise_exception('only user turns') }}{% endif %}Q: {{ m['content'] }}\n"
             "{% endfor %}{% if add_generation_prompt %}A:{% endif %}")


@pytest.mark.parametrize("template, separator", [(None, " "), (CHATML, ""), (USER_ONLY, "")])
def test_answers_follow_the_chat_templates_separator(teacher, template, separator):
    from transformers import AutoTokenizer

    from cllm_vllm.training.data import answer_separator, encode_answer, encode_prompt

    tok = AutoTokenizer.from_pretrained(str(teacher))
    if template is not None:
        tok.chat_template = template
    messages = [{"role": "user", "content": "how many apples"}]
    assert answer_separator(tok) == separator
    answer = encode_answer(tok, "7 apples")
    assert answer[-1] == tok.eos_token_id
    # prompt + answer reads as the template's own rendering of the exchange
    text = tok.decode(encode_prompt(tok, messages) + answer[:-1])
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected + separator + "7 apples"
