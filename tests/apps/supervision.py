"""A supervised worker pool for tests: ``mesh run tests.apps.supervision:app`` is one worker
replica on the topics named ``<MESH_TEST_PREFIX>.*``.

Environment: ``MESH_WORKER_ID`` names the replica; ``MESH_TEST_WORKER_FAILS=1`` makes
every task fail on it; ``MESH_TEST_HEARTBEAT_S`` sets the heartbeat interval;
``MESH_TEST_MAX_FAILURES`` the worker's own quarantine limit (default 3; ``none``: only
the supervisor quarantines it). A job whose prompt is ``"poison"`` fails on every worker.
"""

from __future__ import annotations

import asyncio
import os

from mesh import Context, Topic
from mesh.patterns.supervision.supervisor import WorkerService, WorkerTopics
from topics.supervision import Job, JobResult


def build(prefix: str) -> tuple[WorkerTopics, Topic[JobResult]]:
    """The pool's topics and the result topic, named ``<prefix>.*``."""
    jobs = Topic(f"{prefix}.jobs", Job, key="job_id", partitions=3)
    return WorkerTopics.named(prefix, jobs), Topic(f"{prefix}.results", JobResult, key="job_id")


def service(prefix: str, *, worker_id: str | None = None, fails: bool = False,
            heartbeat_s: float = 0.5, max_failures: int | None = 3) -> WorkerService:
    """One worker replica; ``fails`` makes every task raise."""
    topics, results = build(prefix)

    async def perform(job: Job, ctx: Context) -> JobResult:
        if fails:
            raise RuntimeError(f"worker {replica.worker_id} is broken (job {job.job_id})")
        if job.prompt == "poison":
            raise ValueError(f"job {job.job_id} is poison")
        if job.effort_ms:
            await asyncio.sleep(job.effort_ms / 1000)
        return JobResult(job_id=job.job_id, worker_id=replica.worker_id,
                         answer=job.prompt.upper())

    replica = WorkerService(topics, perform, produces=results, worker_id=worker_id,
                            heartbeat_s=heartbeat_s, max_failures=max_failures)
    return replica


PREFIX = os.environ.get("MESH_TEST_PREFIX", "workers-test")
_LIMIT = os.environ.get("MESH_TEST_MAX_FAILURES", "3")
replica = service(PREFIX, fails=os.environ.get("MESH_TEST_WORKER_FAILS") == "1",
                  heartbeat_s=float(os.environ.get("MESH_TEST_HEARTBEAT_S", "0.5")),
                  max_failures=None if _LIMIT == "none" else int(_LIMIT))
app = replica.app
pool = replica.topics  # module level: `mesh workers -t tests.apps.supervision` finds its status
