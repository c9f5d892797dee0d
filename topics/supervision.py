"""Topics of the supervision example (examples/supervision.py): jobs in, results out,
and the pool's status, outcomes, control, events, supervision, retries and dead-task
topics."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import Topic
from mesh.patterns.supervision.supervisor import WorkerTopics


class Job(BaseModel):
    """One unit of work for any worker of the pool."""

    job_id: str
    prompt: str
    effort_ms: int = 0  # simulated work time


class JobResult(BaseModel):
    """What a worker made of a job, and which worker it was."""

    job_id: str
    worker_id: str
    answer: str


jobs = Topic("workers.jobs", Job, key="job_id", partitions=3)
results = Topic("workers.results", JobResult, key="job_id", partitions=3)

pool = WorkerTopics.named("workers", jobs)
