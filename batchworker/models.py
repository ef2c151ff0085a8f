"""Job and instance vocabulary: statuses, EC2 states and the job identity rule."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "QUEUED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING)


class InstanceState(str, Enum):
    """EC2 instance states, mapped in this one place."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SHUTTING_DOWN = "shutting-down"
    TERMINATED = "terminated"

    @property
    def is_up(self) -> bool:
        """Billing or about to bill: the instance was started and has not been stopped."""
        return self in (InstanceState.PENDING, InstanceState.RUNNING)


POOL_TAG_KEY = "batchworker:pool"


@dataclass(frozen=True)
class Instance:
    instance_id: str
    state: InstanceState
    instance_type: str = ""
    launch_time: datetime | None = None
    availability_zone: str | None = None


@dataclass(frozen=True)
class Job:
    job_id: str
    status: JobStatus
    input_bucket: str
    input_key: str
    input_version: str | None = None
    input_size_bytes: int | None = None
    instance_id: str | None = None
    created_at: str = ""
    updated_at: str = ""
    error: str | None = None
    manifest_key: str | None = None
    attempts: int = 0  # dispatch claims: each one launches the job once
    retries: int = 0  # dispatches the reaper ordered after a loss or a stuck dispatch
    running_since: str | None = None
    lease_expires_at: str | None = None
    # Set while no instance of the pool could be started for lack of EC2 capacity (cleared at dispatch).
    waiting_reason: str | None = None
    capacity_wait_since: str | None = None
    # The job package it was pinned to when accepted ({"name", "version", "uri"}) and its resolved
    # parameters; None for an upload refused before a package was found (it fails at once) and for rows of
    # the removed built-in model job.
    package: dict | None = None
    params: dict | None = None
    items_done: int | None = None  # progress the job's lease heartbeat reports, when its runner counts items
    items_total: int | None = None
    # What its instance said it cannot do ("cannot reach S3 (...); add ..."), from the job's network check.
    instance_problem: str | None = None

    @property
    def output_prefix(self) -> str:
        return output_prefix(self.job_id)


def job_id_for(bucket: str, key: str, version_or_etag: str | None) -> str:
    """The job id is derived from the object's identity, so every delivery of one upload maps to one job."""
    identity = "\n".join([bucket, key, (version_or_etag or "").strip('"')])
    return "j-" + hashlib.sha256(identity.encode()).hexdigest()[:16]


def output_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def manifest_key(job_id: str) -> str:
    return output_prefix(job_id) + "manifest.json"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def isoformat(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
