"""Pure decisions of the control plane, kept apart from their side effects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from batchworker.models import Instance, InstanceState, Job, JobStatus


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str


def should_stop(
    now: datetime,
    instance: Instance,
    active_jobs: Iterable[Job],
    idle_grace_seconds: float = 0.0,
    last_job_finished_at: datetime | None = None,
) -> StopDecision:
    """Decide whether `instance` may be stopped now.

    The instance stays up while any of these holds:
    - it is not running (pending, stopping, stopped: nothing to stop now);
    - a job is dispatched to it or running on it;
    - a job is queued for it, or queued and not yet placed on any instance (it will need one);
    - its last job finished less than `idle_grace_seconds` ago (work arriving right after is cheaper
      on a warm instance than after a new boot).
    Otherwise it stops.
    """
    if instance.state is not InstanceState.RUNNING:
        return StopDecision(False, f"instance is {instance.state.value}")
    for job in active_jobs:
        if job.status in (JobStatus.DISPATCHED, JobStatus.RUNNING) and job.instance_id == instance.instance_id:
            return StopDecision(False, f"job {job.job_id} is {job.status.value.lower()} on it")
        if job.status is JobStatus.QUEUED and job.instance_id in (None, instance.instance_id):
            return StopDecision(False, f"job {job.job_id} is queued")
    if last_job_finished_at is not None and idle_grace_seconds > 0:
        idle_seconds = (now - last_job_finished_at).total_seconds()
        if idle_seconds < idle_grace_seconds:
            return StopDecision(False, f"idle for {idle_seconds:.0f}s of a {idle_grace_seconds:.0f}s grace period")
    return StopDecision(True, "no queued or running job")

