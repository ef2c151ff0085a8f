"""`submit --wait`: follow jobs through queued -> instance starting -> running -> done."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from batchworker.cli.client import Deployment
from batchworker.cli.views import Snapshot, take_snapshot
from batchworker.models import InstanceState, Job, JobStatus


def stage(job: Job | None, snapshot: Snapshot) -> str:
    """A user's words for where a job is."""
    if job is None:
        return "uploaded"
    if job.status.is_terminal:
        return "done: " + job.status.value.lower()
    if job.status is JobStatus.RUNNING:
        return "running"
    if job.status is JobStatus.DISPATCHED:
        # Launched on the instance (it holds a lease) but its code has not started: waiting is not running.
        return "queued (waiting for a slot)" if job.lease_expires_at else "starting job"
    states = {i.instance_id: i.state for i in snapshot.instances}
    if states.get(job.instance_id) is InstanceState.RUNNING:
        return "queued (instance up)"
    if job.instance_id:
        return "queued (instance starting)"
    return "queued"


def follow(deployment: Deployment, named: dict[str, str], console: Console, timeout_seconds: float) -> list[Job]:
    """Poll until every job in `named` (job id -> file) is done; return the final jobs."""
    deadline = time.monotonic() + timeout_seconds
    with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
        while True:
            snapshot = take_snapshot(deployment, list(named))
            by_id = {job.job_id: job for job in snapshot.jobs}
            live.update(_table(named, by_id, snapshot))
            if len(by_id) == len(named) and all(job.status.is_terminal for job in by_id.values()):
                return [by_id[job_id] for job_id in named]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"jobs not done after {timeout_seconds:.0f}s; follow them with `batchworker status`"
                )
            time.sleep(0.5)


def _table(named: dict[str, str], by_id: dict[str, Job], snapshot: Snapshot) -> Table:
    table = Table(title="jobs")
    table.add_column("file")
    table.add_column("job")
    table.add_column("stage")
    for job_id, name in named.items():
        table.add_row(name, job_id, stage(by_id.get(job_id), snapshot))
    instances = ", ".join(f"{i.instance_id} {i.state.value}" for i in snapshot.instances)
    table.caption = f"instances: {instances}"
    return table
