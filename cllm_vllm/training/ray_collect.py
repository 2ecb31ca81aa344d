"""Trajectory collection on a Ray cluster: teacher replicas as actors, shards as work.

The driver (:func:`cllm_vllm.training.trajectories.collect`) plans the run and writes
every file; actors only compute. A shard is a pure function of the job and its index, so
one that fails (an exception) or is lost (its actor died) is simply computed again, on
the same actor or on a replacement; a shard that keeps failing stops the run with its
last error. Every replica reports its teacher's fingerprint and tokenizer hash before it
gets work: a node with another copy of the model stops the run instead of mixing data.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

from ..ray_cluster import RayOptions, connect, replica_resources
from .trajectories import (
    CollectJob,
    Shard,
    TrajectoryError,
    compute_shard,
    load_teacher,
    teacher_identity,
)


def replica_device(options: RayOptions) -> str:
    """``cuda`` when the cluster has GPUs (one per replica), else ``cpu``."""
    return "cuda" if "num_gpus" in replica_resources(options) else "cpu"


class TeacherReplica:
    """One copy of the teacher (a Ray actor)."""

    def __init__(self, teacher: str, device: str, dtype: str, threads: int) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.teacher = teacher
        self.model = load_teacher(teacher, device, dtype)

    def identity(self) -> dict:
        return teacher_identity(self.teacher)

    def compute(self, job: CollectJob, s: int, inject: str | None = None) -> Shard:
        if inject is not None:
            if inject == "exit":
                os._exit(1)
            raise RuntimeError(f"injected failure of shard {s}")
        return compute_shard(self.model, job, s)


def compute_shards(job: CollectJob, todo: list[int], device: str, dtype: str,
                   manifest: dict, options: RayOptions) -> Iterator[Shard]:
    """Compute the shards ``todo`` on ``options.workers`` replicas; yield each as it is
    done (in any order)."""
    ray = connect(options)
    from ray.exceptions import RayActorError, RayTaskError

    actor_cls = ray.remote(**replica_resources(options))(TeacherReplica)
    expected = {key: manifest[key] for key in ("teacher_fingerprint", "tokenizer_hash")}
    job_ref = ray.put(job)

    def start(n: int) -> list:
        """``n`` replicas, loading their teachers in parallel, each checked."""
        new = [actor_cls.remote(job.teacher, device, dtype, options.cpus_per_worker)
               for _ in range(n)]
        for got in ray.get([a.identity.remote() for a in new]):
            if got != expected:
                for a in new:
                    ray.kill(a)
                raise TrajectoryError(
                    f"a Ray replica's teacher at {job.teacher} differs from the driver's "
                    f"({got} vs {expected}): install the same model on every node")
        return new

    queue = deque(todo)
    attempts = dict.fromkeys(todo, 0)
    actors = start(min(options.workers, len(todo)))
    running: dict = {}  # future -> (actor, shard)

    def submit(actor) -> None:
        s = queue.popleft()
        attempts[s] += 1
        inject = options.inject_failures.get(s) if attempts[s] == 1 else None
        running[actor.compute.remote(job_ref, s, inject)] = (actor, s)

    try:
        for actor in actors:
            if queue:
                submit(actor)
        while running:
            [done], _ = ray.wait(list(running), num_returns=1)
            actor, s = running.pop(done)
            try:
                shard = ray.get(done)
            except (RayTaskError, RayActorError) as e:
                if attempts[s] >= options.max_attempts:
                    raise TrajectoryError(f"shard {s} failed {attempts[s]} times on Ray; "
                                          f"last error: {e}") from e
                queue.appendleft(s)  # pure: computing it again gives the same shard
                if isinstance(e, RayActorError):  # the replica is gone: replace it
                    actors.remove(actor)
                    [actor] = start(1)
                    actors.append(actor)
                submit(actor)
                continue
            if queue:
                submit(actor)
            yield shard
    finally:
        for actor in actors:
            ray.kill(actor)
