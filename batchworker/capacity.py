"""EC2 capacity shortages: move waiting jobs to an instance in another Availability Zone, or keep them queued.

`InsufficientInstanceCapacity` is a normal day for GPU types: one AZ runs out for minutes or hours while
others have room. A shortage is never a reason to fail an upload that was fine. The worker function tries
the job's instance for a while, then the pool's instances in other AZs (moving the jobs there), and when
none can start it leaves the jobs QUEUED with a "waiting for capacity" reason; the reaper dispatches them
again every CAPACITY_RETRY_INTERVAL_SECONDS and fails them only after `max_capacity_wait_seconds`.
"""

from __future__ import annotations

import logging

from batchworker.decisions import place_job
from batchworker.errors import InsufficientCapacity
from batchworker.instances import InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.models import Job, JobStatus

logger = logging.getLogger(__name__)

CAPACITY_RETRY_SECONDS = 30.0  # how long one instance's start is retried before the jobs try another AZ
CAPACITY_RETRY_INTERVAL_SECONDS = 60.0  # the reaper's pace for jobs waiting for capacity


def start_somewhere(
    instance_id: str,
    group: list[Job],
    deadline: float,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    max_jobs_per_instance: int,
) -> str:
    """Get an instance running for the group: its own, else one in an AZ that has not refused. Returns its id.

    The jobs move with the choice (job row and ledger). Raises InsufficientCapacity naming every instance and
    AZ that refused when none is left to try.
    """
    refused: list[InsufficientCapacity] = []
    current = instance_id
    while True:
        try:
            pool.ensure_running(current, deadline, reason=f"{len(group)} job(s) waiting",
                                capacity_retry_seconds=CAPACITY_RETRY_SECONDS)
            return current
        except InsufficientCapacity as exc:
            refused.append(exc)
        tried = {i for exc in refused for i in exc.instance_ids}
        short_zones = {z for exc in refused for z in exc.availability_zones}
        candidates = [i for i in pool.list() if i.instance_id not in tried and i.availability_zone not in short_zones]
        placement = None
        if candidates:
            # Each candidate's job count from its ledger item (one BatchGetItem), as the trigger places.
            entries = ledger.read_many(i.instance_id for i in candidates)
            load = {i: len(entry.placed_job_ids) for i, entry in entries.items()}
            placement = place_job(candidates, load, max_jobs_per_instance)
        if placement is None:
            raise InsufficientCapacity(
                "; ".join(str(exc) for exc in refused), tuple(sorted(tried)), tuple(sorted(short_zones))
            )
        logger.warning("no capacity for %s; moving %d job(s) to %s (%s)", current, len(group),
                       placement.instance_id, placement.reason)
        moved = _move(group, current, placement.instance_id, jobs, ledger)
        group[:] = moved
        current = placement.instance_id


def _move(group: list[Job], old: str, new: str, jobs: JobStore, ledger: InstanceLedger) -> list[Job]:
    """Re-place the still-queued jobs of the group on `new`: the new ledger first (so no stop misses them)."""
    job_ids = [job.job_id for job in group]
    ledger.note_assignment(new, job_ids=job_ids)
    moved = []
    for job in group:
        jobs.assign_instance(job.job_id, new)
        current = jobs.get(job.job_id)
        if current is not None:
            moved.append(current)
    ledger.release(old, job_ids)
    return moved


def wait_for_capacity(group: list[Job], exc: InsufficientCapacity, jobs: JobStore) -> None:
    """No instance could start: the jobs stay QUEUED, and `status` says why; the reaper tries again."""
    reason = f"waiting for capacity: {exc}"
    for job in group:
        if jobs.note_waiting_for_capacity(job.job_id, reason):
            logger.warning("job %s %s", job.job_id, reason)


def is_waiting_for_capacity(job: Job) -> bool:
    return job.status is JobStatus.QUEUED and job.capacity_wait_since is not None
