"""Fixes to vLLM that a ``vllm.general_plugins`` plugin cannot make.

Installed as ``cllm_vllm.patches``.

Each module names the vLLM version it was written for, is applied by the package itself
(no hand edits to vLLM's files) and has a test under ``tests/``.
"""
