"""Joining a Ray cluster: the options every ``--ray`` command shares, and the one place
that imports Ray (its authentication mode must be set before the import).

Needs only Ray, not vLLM: ``cllm_vllm.training`` uses it as well as ``generate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None
    """Cluster to join (``ray start --head`` printed it); None: ``RAY_ADDRESS``, a cluster
    running on this machine, or a new local instance (``ray.init``'s order)."""
    workers: int = 2
    """Replicas (actors): teachers for ``collect``, vLLM engines for ``generate``."""
    cpus_per_worker: int = 1
    """CPUs per replica on a cluster without GPUs (its torch threads); with GPUs each
    replica takes one GPU."""
    max_attempts: int = 3
    """Tries per shard before the run stops."""
    inject_failures: dict = field(default_factory=dict)
    """For tests: ``{shard: "raise" | "exit"}`` makes that shard's first attempt raise, or
    kill its actor's process."""


def connect(options: RayOptions):
    """Join the cluster (or start a local instance) once per process; returns the ``ray``
    module (import it through here).

    Ray 2.60 starts clusters with token authentication (``ray start`` writes the token to
    ``~/.ray/auth_token``), but a driver that joins one sends its token only in token
    mode: with ``RAY_AUTH_MODE`` unset and a token at hand, ask for token mode (before
    Ray is imported: it reads the mode then).
    """
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"  # read when Ray is first imported
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return ray


def replica_resources(options: RayOptions) -> dict:
    """What each replica asks of the cluster: one GPU where it has GPUs, else
    ``cpus_per_worker`` CPUs."""
    ray = connect(options)
    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": 1}
    return {"num_cpus": options.cpus_per_worker}


def _token_available() -> bool:
    from pathlib import Path

    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()
