"""Bad Jacobi configurations fail before any engine starts, with a message naming the problem."""

from __future__ import annotations

import pytest

from cllm_vllm.config import to_vllm_speculative_config
from cllm_vllm.vllm_hooks import check_vllm_surface, jacobi_spec_from_cli


def test_translation():
    spec, opts = to_vllm_speculative_config(
        {"method": "jacobi", "num_speculative_tokens": 8, "fill": "prompt"}, 512)
    assert spec == {"method": "custom_class", "model": "cllm_vllm.proposer.JacobiProposer",
                    "num_speculative_tokens": 8}
    assert opts.fill == "prompt" and opts.adaptive
    _, fixed = to_vllm_speculative_config({"method": "jacobi", "adaptive": False}, 512)
    assert not fixed.adaptive
    schedule = [(1, 4, 8), (5, 64, 2)]
    spec, _ = to_vllm_speculative_config(
        {"method": "jacobi", "num_speculative_tokens_per_batch_size": schedule}, 512)
    assert spec["num_speculative_tokens_per_batch_size"] == schedule


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"method": "jacobi", "num_speculative_tokens": 0}, "must be an integer >= 1"),
        ({"method": "jacobi", "num_speculative_tokens": -3}, "must be an integer >= 1"),
        ({"method": "jacobi", "num_speculative_tokens": 512}, "smaller than max_model_len=512"),
        ({"method": "jacobi", "num_speculative_tokens": 4, "blok": 3}, r"unknown option.*blok"),
        ({"method": "jacobi", "fill": "magic"}, "unknown Jacobi fill policy 'magic'"),
        ({"method": "jacobi", "adaptive": "yes"}, "'adaptive' must be true or false"),
    ],
)
def test_bad_options(spec, match):
    with pytest.raises(ValueError, match=match):
        to_vllm_speculative_config(spec, 512)


def test_the_v2_model_runner_is_refused_with_reason():
    with pytest.raises(ValueError, match="V1 model runner.*VLLM_USE_V2_MODEL_RUNNER"):
        to_vllm_speculative_config({"method": "jacobi"}, 512, v2_model_runner=True)
    to_vllm_speculative_config({"method": "jacobi"}, 512, v2_model_runner=None)  # auto: V1


def test_async_scheduling_is_refused_with_reason():
    with pytest.raises(ValueError, match="async_scheduling"):
        to_vllm_speculative_config({"method": "jacobi"}, 512, async_scheduling=True)


def test_the_ray_executor_is_refused_on_cpu_only():
    class RayDistributedExecutor:  # vLLM also takes an executor class
        pass

    for backend in ("ray", RayDistributedExecutor):
        with pytest.raises(ValueError, match="Ray executor does not support the CPU platform"):
            to_vllm_speculative_config({"method": "jacobi"}, 512, executor_backend=backend,
                                       cpu_platform=True)
        to_vllm_speculative_config({"method": "jacobi"}, 512, executor_backend=backend)
    for backend in ("mp", "uni", None):
        to_vllm_speculative_config({"method": "jacobi"}, 512, executor_backend=backend,
                                   cpu_platform=True)


def test_cli_flags_translate():
    from argparse import Namespace

    assert jacobi_spec_from_cli(Namespace(jacobi=False, jacobi_block_size=None,
                                          jacobi_fill=None)) is None
    spec = jacobi_spec_from_cli(Namespace(jacobi=True, jacobi_block_size=8, jacobi_fill=None,
                                          speculative_config=None))
    assert spec == {"method": "jacobi", "num_speculative_tokens": 8}
    spec = jacobi_spec_from_cli(Namespace(jacobi=True, jacobi_block_size=None, jacobi_fill=None,
                                          jacobi_fixed_block=True, speculative_config=None))
    assert spec == {"method": "jacobi", "num_speculative_tokens": 16, "adaptive": False}
    with pytest.raises(ValueError, match="need --jacobi"):
        jacobi_spec_from_cli(Namespace(jacobi=False, jacobi_block_size=8, jacobi_fill=None))
    with pytest.raises(ValueError, match="need --jacobi"):
        jacobi_spec_from_cli(Namespace(jacobi=False, jacobi_block_size=None, jacobi_fill=None,
                                       jacobi_fixed_block=True))


def test_vllm_internals_are_where_we_expect():
    """Fails loudly when a vLLM upgrade moves one of the seams in cllm_vllm.vllm_hooks."""
    assert check_vllm_surface() == []


@pytest.mark.engine
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(speculative_config={"method": "jacobi", "num_speculative_tokens": 0}), ">= 1"),
        (dict(speculative_config={"method": "jacobi", "num_speculative_tokens": 600}),
         "smaller than max_model_len"),
        (dict(speculative_config={"method": "jacobi", "colour": 1}), "unknown option"),
        (dict(speculative_config={"method": "jacobi"}, async_scheduling=True),
         "async_scheduling"),
    ],
)
def test_llm_refuses_bad_config_before_engine_start(models, kwargs, match):
    from vllm import LLM

    with pytest.raises(ValueError, match=match):
        LLM(str(models["llama"]), max_model_len=512, **kwargs)


@pytest.mark.engine
def test_llm_refuses_the_v2_runner_before_engine_start(models, monkeypatch):
    import vllm.envs
    from vllm import LLM

    # An engine started earlier in this process froze vLLM's env reads (enable_envs_cache);
    # a user's process sets the variable before any engine.
    vllm.envs.disable_envs_cache()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER"):
        LLM(str(models["llama"]), max_model_len=512, speculative_config={"method": "jacobi"})


def test_speculative_config_json_on_the_command_line(models):
    """`vllm serve M --speculative-config '{"method": "jacobi", ...}'` and `--jacobi` build
    the same engine config (parsed by vLLM's own serve parser, no engine started)."""
    import json as _json

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def spec_of(argv):
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        return AsyncEngineArgs.from_cli_args(args).create_engine_config().speculative_config

    base = ["--model", str(models["llama"]), "--max-model-len", "512"]
    a = spec_of(base + ["--speculative-config",
                        _json.dumps({"method": "jacobi", "num_speculative_tokens": 6})])
    b = spec_of(base + ["--jacobi", "--jacobi-block-size", "6"])
    for cfg in (a, b):
        assert cfg.method == "custom_class" and cfg.num_speculative_tokens == 6
        assert cfg.model == "cllm_vllm.proposer.JacobiProposer"
