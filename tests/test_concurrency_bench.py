"""`benchmarks/concurrency.py`'s method names: the sweep's engines are built from them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def concurrency():
    # Importing the script sets VLLM_ENABLE_V1_MULTIPROCESSING=0 (its engines run
    # in-process); that must not leak into the tests that start real `vllm serve`.
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("concurrency")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


def test_fixed_n_is_a_fixed_block_of_n_and_other_names_are_refused(concurrency):
    names = [concurrency.method_name(m) for m in ("ar", "adaptive", "fixed", "fixed-3")]
    specs = concurrency.speculative_configs(names, k=16)
    assert specs["ar"] is None
    assert specs["fixed"] == {"method": "jacobi", "num_speculative_tokens": 16,
                              "adaptive": False}
    assert specs["fixed-3"] == {"method": "jacobi", "num_speculative_tokens": 3,
                                "adaptive": False}
    assert specs["adaptive"]["adaptive"] is True
    for bad in ("fixed-0", "fixed-", "fixed-x", "eagle"):
        with pytest.raises(argparse.ArgumentTypeError, match="fixed-N"):
            concurrency.method_name(bad)
