"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process."""

from __future__ import annotations


def register() -> None:
    from cllm_vllm import vllm_hooks

    vllm_hooks.install()
