"""What the CLI shows about jobs and instances: one snapshot, as JSON or as tables."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from batchworker.cli.client import Deployment
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.models import Instance, Job


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
    }


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
    else:
        selected = jobs.all()
    return Snapshot(pool.list(), selected)


def render(snapshot: Snapshot, console: Console) -> None:
    instances = Table(title="instances")
    for column in ("instance", "state", "type"):
        instances.add_column(column)
    for instance in snapshot.instances:
        instances.add_row(instance.instance_id, instance.state.value, instance.instance_type)
    console.print(instances)
    jobs = Table(title="jobs")
    for column in ("job", "status", "input", "instance", "attempts", "updated", "error"):
        jobs.add_column(column, overflow="fold")
    for job in snapshot.jobs:
        jobs.add_row(
            job.job_id, job.status.value, job.input_key, job.instance_id or "-", str(job.attempts),
            job.updated_at, (job.error or "")[:120],
        )
    console.print(jobs)
