"""What the CLI shows about jobs and instances: one snapshot, as JSON (all values) or as tables (status_table)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from batchworker.capacity import is_waiting_for_capacity
from batchworker.cli.client import Deployment
from batchworker.errors import UsageError
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.models import Instance, Job, parse_time, utc_now


@dataclass
class Snapshot:
    instances: list[Instance]
    jobs: list[Job]

    def to_json(self) -> dict:
        return {
            "instances": [
                {"id": i.instance_id, "state": i.state.value, "instance_type": i.instance_type} for i in self.instances
            ],
            "jobs": [job_json(job) for job in self.jobs],
        }


def job_json(job: Job) -> dict:
    return {
        "job_id": job.job_id,
        "status": job.status.value,
        "input_key": job.input_key,
        "input_bucket": job.input_bucket,
        "instance_id": job.instance_id,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "attempts": job.attempts,
        "error": job.error,
        "manifest_key": job.manifest_key,
        "running_since": job.running_since,
        "items_done": job.items_done,
        "items_total": job.items_total,
        # why a QUEUED job is not running yet ("waiting for capacity: ..."), else null
        "waiting": job.waiting_reason if is_waiting_for_capacity(job) else None,
        "queued_s": queued_seconds(job),
        # what the job's instance cannot reach ("cannot reach S3 (...); add ..."), else null
        "instance_problem": job.instance_problem,
    }


def queued_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Seconds from the upload's acceptance until the job's code started (until now while it still waits).

    Waiting is not running: this is the time in the queue and on the instance waiting for a slot. None for a
    job that ended without ever starting.
    """
    if not job.created_at:
        return None
    if job.running_since:
        end = parse_time(job.running_since)
    elif job.status.is_terminal:
        return None
    else:
        end = now or utc_now()
    return round(max((end - parse_time(job.created_at)).total_seconds(), 0.0), 3)


def stores(deployment: Deployment) -> tuple[JobStore, InstancePool]:
    dynamodb = deployment.client("dynamodb")
    jobs = JobStore(deployment.jobs_table, client=dynamodb)
    pool = InstancePool(
        deployment.pool_tag, InstanceHistory(deployment.instance_events_table, client=dynamodb),
        client=deployment.client("ec2"),
    )
    return jobs, pool


def take_snapshot(deployment: Deployment, job_ids: list[str] | None = None) -> Snapshot:
    jobs, pool = stores(deployment)
    if job_ids:
        found = [jobs.get(job_id) for job_id in job_ids]
        selected = [job for job in found if job is not None]
        if len(selected) < len(job_ids):  # short ids, as `status` prints them
            every = jobs.all()
            selected = [job for job_id in job_ids for job in _by_prefix(every, job_id)]
    else:
        selected = jobs.all()
    return Snapshot(pool.list(), selected)


def _by_prefix(jobs: list[Job], job_id: str) -> list[Job]:
    matches = [job for job in jobs if job.job_id.startswith(job_id)]
    if len(matches) > 1:
        raise UsageError(f"{job_id} matches {len(matches)} jobs; give more of the id")
    return matches
