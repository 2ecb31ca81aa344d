"""The one way this package wraps a vLLM (or llvmlite) attribute, shared by
:mod:`cllm_vllm.vllm_hooks` and the fixes in this package."""

from __future__ import annotations

import functools


def wrap(owner, name: str, tag: str, make_wrapper) -> None:
    """Replace ``owner.name`` with ``make_wrapper(original)``, once per ``tag``.

    The wrapper carries ``_cllm_vllm_<tag>``. Independent wrappers may stack on one
    attribute (``GPUModelRunner._sample`` has two): ``functools.wraps`` copies the inner
    wrapper's markers onto the outer one, so the top of the stack shows every tag beneath
    it and each wrapper is installed once, in whatever order the installs run. The
    original stays reachable through ``__wrapped__`` (``inspect.unwrap``).
    """
    marker = f"_cllm_vllm_{tag}"
    original = getattr(owner, name)
    if getattr(original, marker, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, marker, True)
    setattr(owner, name, wrapper)
