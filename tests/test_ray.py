"""Beyond one process: trajectory collection and batch generation on Ray, tensor parallel.

A Ray head is started once for the module (`ray start --head`, loopback, 2 CPUs, a small
object store, Ray 2.60's default token authentication) and stopped at the end. Everything
that uses Ray runs in a subprocess (the CLI, or a short script), as a user's driver
would; this process never imports Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from cllm_vllm.evaluation import BUNDLED_CLLM, heldout_records
from cllm_vllm.training.trajectories import MANIFEST, CollectConfig, collect

pytestmark = pytest.mark.engine

ENGINE_ARGS = json.dumps({"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
                          "kv_cache_memory_bytes": 64 * 2**20})
ENV = dict(os.environ, TQDM_DISABLE="1")
ENV.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # real engine processes, as users get
ENV.pop("RAY_AUTH_MODE", None)
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def ray_head():
    port = free_port()
    start = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--object-store-memory", str(200 * 2**20),
             "--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=ENV, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["ray", "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def cli(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cllm_vllm.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# --- collect --ray --------------------------------------------------------------------

CFG = CollectConfig(block_size=8, max_new_tokens=32, batch_size=3, shard_size=4)
COLLECT_FLAGS = ["--block-size", CFG.block_size, "--max-new-tokens", CFG.max_new_tokens,
                 "--batch-size", CFG.batch_size, "--shard-size", CFG.shard_size]


@pytest.fixture(scope="module")
def teacher_and_prompts(tmp_path_factory):
    from cllm_vllm.training.tiny import build_tiny_model, synthetic_text, train_tokenizer

    root = tmp_path_factory.mktemp("ray-collect")
    tok = train_tokenizer(synthetic_text(2000), 512, root / "tok")
    build_tiny_model(root / "model", tok, hidden_size=64, num_heads=2,
                     initializer_range=0.1, seed=3)
    lines = synthetic_text(60, seed=9)
    records = [{"messages": [{"role": "user", "content": " ".join(lines[i: i + 1 + i % 3])}]}
               for i in range(18)]  # 5 shards, the last one short
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    local = root / "local"
    collect(root / "model", records, local, CFG, progress=False, device="cpu")
    return root / "model", prompts, local


def ray_collect(teacher, prompts, out, address, inject, max_attempts=3):
    """The Python API (the CLI has no failure injection), in a driver process of its own."""
    script = f"""
import sys
from cllm_vllm.training.data import load_records
from cllm_vllm.ray_cluster import RayOptions
from cllm_vllm.training.trajectories import CollectConfig, TrajectoryError, collect
cfg = CollectConfig(**{CFG.__dict__!r})
opts = RayOptions(address={address!r}, workers=2, max_attempts={max_attempts},
                  inject_failures={inject!r})
try:
    collect({str(teacher)!r}, load_records({str(prompts)!r}), {str(out)!r}, cfg,
            progress=False, ray=opts)
except TrajectoryError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""
    return subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=900)


def assert_same_dir(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names  # no .tmp left behind
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def test_collect_on_ray_is_byte_identical_and_survives_failures(ray_head, teacher_and_prompts,
                                                                tmp_path):
    teacher, prompts, local = teacher_and_prompts
    out = tmp_path / "ray"
    # Shard 0's first attempt raises; shard 2's kills its replica's process (a lost actor).
    proc = ray_collect(teacher, prompts, out, ray_head, {0: "raise", 2: "exit"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_dir(out, local)
    ids = [json.loads(line)["id"] for p in sorted(out.glob("shard-*.jsonl"))
           for line in p.read_text().splitlines()]
    assert ids == list(range(18))  # none lost, none twice


def test_a_half_done_ray_collection_resumes_with_or_without_ray(ray_head, teacher_and_prompts,
                                                               tmp_path):
    teacher, prompts, local = teacher_and_prompts
    half = tmp_path / "half"
    # Shard 3 fails on its only allowed attempt: the run stops with the others written.
    proc = ray_collect(teacher, prompts, half, ray_head, {3: "raise"}, max_attempts=1)
    assert proc.returncode == 3 and "shard 3 failed 1 times" in proc.stderr, proc.stderr[-3000:]
    done = json.loads((half / MANIFEST).read_text())["shards"]
    assert "shard-00003.jsonl" not in done and 1 <= len(done) <= 4
    for name, extra in (("with-ray", ["--ray", ray_head, "--workers", 2]), ("local", [])):
        out = tmp_path / name
        shutil.copytree(half, out)
        cli("collect", "--teacher", teacher, "--prompts", prompts, "--out", out,
            *COLLECT_FLAGS, *extra)
        assert_same_dir(out, local)


def test_a_replica_with_another_teacher_stops_the_run(ray_head, teacher_and_prompts, tmp_path):
    """The driver's manifest names one teacher; a replica that loads other weights (here:
    the driver's copy changed after planning) is refused before it computes anything."""
    teacher, prompts, _ = teacher_and_prompts
    other = tmp_path / "teacher"
    shutil.copytree(teacher, other)
    out = tmp_path / "out"
    script = f"""
import sys
from pathlib import Path
import cllm_vllm.training.trajectories as t
from cllm_vllm.training.data import load_records
from cllm_vllm.ray_cluster import RayOptions
plan = t.plan_collection
def plan_then_change(*a, **k):
    out = plan(*a, **k)
    cfg = Path({str(other)!r}) / "config.json"
    cfg.write_text(cfg.read_text().replace("{{", '{{"note": 1, ', 1))
    return out
t.plan_collection = plan_then_change
try:
    t.collect({str(other)!r}, load_records({str(prompts)!r}), {str(out)!r},
              t.CollectConfig(**{CFG.__dict__!r}), progress=False,
              ray=RayOptions(address={ray_head!r}, workers=1))
except t.TrajectoryError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "differs from the driver's" in proc.stderr
    assert not list(out.glob("shard-*"))


# --- generate ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """64 held-out prompts (half arithmetic, half ShareGPT): Jacobi on one local engine,
    and AR, through `cllm-vllm generate`."""
    root = tmp_path_factory.mktemp("generate")
    records = heldout_records("arithmetic", 32) + heldout_records("sharegpt", 32)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                               for r in records))
    common = ["--model", BUNDLED_CLLM, "--input", prompts, "--max-tokens", 40,
              "--engine-args", ENGINE_ARGS]
    cli("generate", *common, "--output", root / "jacobi.jsonl")
    cli("generate", *common, "--output", root / "ar.jsonl", "--no-jacobi")
    return root, common


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_rows_are_ars_greedy_output_in_input_order(generated):
    root, _ = generated
    jacobi, ar = rows(root / "jacobi.jsonl"), rows(root / "ar.jsonl")
    assert [r["index"] for r in jacobi] == list(range(64))
    assert [r["token_ids"] for r in jacobi] == [r["token_ids"] for r in ar]
    assert [r["text"] for r in jacobi] == [r["text"] for r in ar]
    assert {r["finish_reason"] for r in jacobi} <= {"stop", "length"}
    assert [r["finish_reason"] for r in jacobi] == [r["finish_reason"] for r in ar]
    assert all(r["tokens_per_step"] is None for r in ar)
    # Adaptive drafting (the default) on 64 requests at once on 2 CPU cores drafts little,
    # but each row reports its own record: some guesses landed.
    assert min(r["tokens_per_step"] for r in jacobi) >= 1.0
    assert max(r["tokens_per_step"] for r in jacobi) > 1.0


def test_generate_on_ray_replicas_matches_one_engine(generated, ray_head):
    root, common = generated
    out = root / "ray.jsonl"
    cli("generate", *common, "--output", out, "--ray", ray_head, "--workers", 2,
        "--chunk", 8)
    got = rows(out)
    assert [r["index"] for r in got] == list(range(64))
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in rows(root / "jacobi.jsonl")]


def test_a_killed_generate_resumes_after_its_last_complete_row(generated, tmp_path):
    root, common = generated
    out = tmp_path / "resumed.jsonl"
    whole = (root / "jacobi.jsonl").read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(whole[:20]) + whole[20][:15])  # killed mid-row
    shutil.copy(root / "jacobi.jsonl.meta.json", tmp_path / "resumed.jsonl.meta.json")
    proc = cli("generate", *common, "--output", out)
    assert "44 rows written" in proc.stdout
    resumed = out.read_bytes()
    assert resumed.splitlines()[:20] == [line.rstrip(b"\n") for line in whole[:20]]
    # (Tokens per step may differ: adaptive drafting follows the measured step times.)
    keep = ("index", "text", "token_ids", "finish_reason")
    assert [{k: r[k] for k in keep} for r in rows(out)] == \
        [{k: r[k] for k in keep} for r in rows(root / "jacobi.jsonl")]
    # Other settings than the rows were made with: refused, the file untouched.
    proc = cli("generate", *common[:-2], "--output", out, "--max-tokens", 8, check=False)
    assert proc.returncode == 2 and "made from other inputs or settings" in proc.stderr
    assert out.read_bytes() == resumed


# --- tensor parallel, and the Ray executor on CPU --------------------------------------

def test_tensor_parallel_2_jacobi_matches_tp_1(generated, tmp_path):
    """vLLM's multiprocessing executor, one OpenMP thread per rank on this machine's cores."""
    root, common = generated
    prompts = tmp_path / "32.jsonl"
    prompts.write_text("".join((root / "prompts.jsonl").read_text().splitlines(True)[:32]))
    args = {**json.loads(ENGINE_ARGS), "tensor_parallel_size": 2,
            "distributed_executor_backend": "mp"}
    env = dict(ENV, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    out = tmp_path / "tp2.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "cllm_vllm.cli", "generate", "--model", str(BUNDLED_CLLM),
         "--input", str(prompts), "--max-tokens", "40", "--engine-args", json.dumps(args),
         "--output", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp1 = rows(root / "jacobi.jsonl")[:32]
    assert [r["token_ids"] for r in rows(out)] == [r["token_ids"] for r in tp1]


def test_jacobi_refuses_the_ray_executor_on_cpu_up_front(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cllm_vllm.patches.vllm_cli", "serve", str(BUNDLED_CLLM),
         "--jacobi", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
         "--port", str(free_port())],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "cannot use distributed_executor_backend='ray'" in proc.stderr
    assert "--distributed-executor-backend mp" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_ray_flags_are_checked_before_any_work(tmp_path):
    proc = cli("generate", "--model", BUNDLED_CLLM, "--input", tmp_path / "none.jsonl",
               "--output", tmp_path / "o.jsonl", "--workers", 3, check=False)
    assert proc.returncode == 2 and "--workers and --cpus-per-worker need --ray" in proc.stderr
    proc = cli("collect", "--teacher", BUNDLED_CLLM, "--prompts", tmp_path / "none.jsonl",
               "--out", tmp_path / "o", "--ray", "--device", "cpu", check=False)
    assert proc.returncode == 2 and "--device and --ray are exclusive" in proc.stderr
    proc = cli("generate", "--model", BUNDLED_CLLM, "--input", tmp_path / "none.jsonl",
               "--output", tmp_path / "o.jsonl", "--engine-args", "{bad", check=False)
    assert proc.returncode == 2 and "--engine-args: not JSON" in proc.stderr
