"""The training loop: schedule, sample order, resume after a kill, torchrun vs one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from cllm_vllm.training.trainer import TrainConfig, lr_at, sample_indices
from cllm_vllm.training.trajectories import CollectConfig, collect


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(out_dir="x", steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_global_batch_is_the_same_however_it_is_split():
    one = TrainConfig(out_dir="x", steps=5, batch_size=8, grad_accum=1, seed=3)
    split = TrainConfig(out_dir="x", steps=5, batch_size=2, grad_accum=2, seed=3)
    for step in range(5):  # crosses the epoch boundary of 13 samples
        whole = sample_indices(step, 0, 0, 1, one, 13)
        parts = [s for m in range(2) for r in range(2)
                 for s in sample_indices(step, m, r, 2, split, 13)]
        assert [i for i, _ in whole] == [i for i, _ in parts]
        # per-sample randomness follows the sample, not the process
        assert [g.random() for _, g in whole] == [g.random() for _, g in parts]
    epoch = [i for s in range(0, 13) for i, _ in sample_indices(s, 0, 0, 1,
             TrainConfig(out_dir="x", steps=1, batch_size=1, seed=3), 13)]
    assert sorted(epoch) == list(range(13))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny teacher and its trajectories (with ground-truth answers)."""
    from cllm_vllm.training.tiny import build_tiny_model, synthetic_text, train_tokenizer

    root = tmp_path_factory.mktemp("trainer")
    tok = train_tokenizer(synthetic_text(1500), 384, root / "tok")
    model_dir = root / "model"
    build_tiny_model(model_dir, tok, hidden_size=64, num_heads=2, initializer_range=0.1,
                     seed=5)
    lines = synthetic_text(48, seed=11)
    records = [{"messages": [{"role": "user", "content": x}], "answer": lines[-1 - i]}
               for i, x in enumerate(lines)]
    collect(model_dir, records, root / "traj",
            CollectConfig(block_size=8, max_new_tokens=24, batch_size=16, shard_size=16),
            progress=False)
    return model_dir, root / "traj"


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", **extra)


def _train_cmd(model_dir, data, out, *extra):
    return ["-m", "cllm_vllm.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--lr", "1e-3", "--no-progress", "--seed", "1", *extra]


def _losses(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(setup, tmp_path, sharding):
    model_dir, data = setup
    common = ["--steps", "6", "--consistency", "local", "--ar-labels", "ground-truth"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, *_train_cmd(model_dir, data, single, *common,
                                                "--batch-size", "4")],
                   check=True, env=_env(), capture_output=True)
    ddp = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(free_port()),
                    *_train_cmd(model_dir, data, ddp, *common, "--batch-size", "1",
                                "--grad-accum", "2", *(["--fsdp"] if sharding == "fsdp" else []))],
                   check=True, env=_env(), capture_output=True)
    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "consistency", "ar"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    assert a[-1]["loss"] < a[0]["loss"]  # it trains
    from safetensors.torch import load_file

    wa = load_file(str(single / "model.safetensors"))
    wb = load_file(str(ddp / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)


def test_killed_training_resumes_to_the_same_result(setup, tmp_path):
    model_dir, data = setup
    args = ["--steps", "40", "--batch-size", "4", "--save-every", "5"]
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, *_train_cmd(model_dir, data, whole, *args)], check=True,
                   env=_env(), capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_train_cmd(model_dir, data, killed, *args)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoint-10").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the kill should land mid-run"
    subprocess.run([sys.executable, *_train_cmd(model_dir, data, killed, *args, "--resume")],
                   check=True, env=_env(), capture_output=True)
    a, b = _losses(whole), _losses(killed)
    assert [r["step"] for r in b] == list(range(40))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(whole / "model.safetensors"))
    wb = load_file(str(killed / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k])
