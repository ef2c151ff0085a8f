"""The control plane's three steps, one per Lambda: accept an upload, dispatch a job, finish a job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from batchworker.config import Settings
from batchworker.decisions import StopDecision, place_job, should_stop
from batchworker.errors import BatchworkerError, NoInstanceAvailable, PermanentError, RejectedEvent
from batchworker.instances import InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.manifests import failed_manifest, write_manifest
from batchworker.models import (
    ACTIVE_STATUSES,
    POOL_TAG_KEY,
    Job,
    JobStatus,
    job_id_for,
    output_prefix,
    utc_now,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One ObjectCreated record, key already URL-decoded."""

    bucket: str
    key: str
    size_bytes: int | None = None
    etag: str | None = None
    version_id: str | None = None

    @property
    def job_id(self) -> str:
        return job_id_for(self.bucket, self.key, self.version_id or self.etag)


class Launcher(Protocol):
    def launch(self, instance_id: str, spec: dict, deadline: float) -> dict: ...


def accept_upload(
    upload: Upload,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    invoke_worker: Callable[[dict], None],
) -> str | None:
    """Record the job, make sure an instance is coming up, hand the job to the worker function.

    Returns the job id, or None when this delivery is a duplicate of a job already under way.
    """
    if upload.bucket != settings.input_bucket:
        raise RejectedEvent(f"event from bucket {upload.bucket!r}; only {settings.input_bucket!r} makes jobs")
    if not upload.key or upload.key.endswith("/"):
        raise RejectedEvent(f"key {upload.key!r} is a folder marker, not a file")
    job = Job(
        job_id=upload.job_id,
        status=JobStatus.QUEUED,
        input_bucket=upload.bucket,
        input_key=upload.key,
        input_version=upload.version_id,
        input_size_bytes=upload.size_bytes,
    )
    if not jobs.create_queued(job):
        existing = jobs.get(job.job_id)
        if existing is not None and existing.status is not JobStatus.QUEUED:
            logger.info("duplicate delivery of job %s (%s); ignored", job.job_id, existing.status.value)
            return None
        # Still QUEUED: an earlier delivery may have died before invoking the worker. Invoking again
        # is safe, the worker claims the job with a conditional write.
    placement = place_job(pool.list(), jobs.active(), settings.max_jobs_per_instance)
    if placement is None:
        raise NoInstanceAvailable(
            f"no instance carries tag {POOL_TAG_KEY}={settings.pool_tag}; run `terraform apply` to create the pool"
        )
    # Bump the instance's generation first: a stop decided before this point can no longer be claimed.
    ledger.note_assignment(placement.instance_id)
    jobs.assign_instance(job.job_id, placement.instance_id)
    if placement.start:
        pool.try_start(placement.instance_id, reason=f"job {job.job_id} queued; {placement.reason}")
    invoke_worker({"job_id": job.job_id})
    logger.info("job %s placed on %s (%s)", job.job_id, placement.instance_id, placement.reason)
    return job.job_id


def dispatch_job(
    job_id: str,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    launcher: Launcher,
    s3_client,
    clock: Callable[[], float] = time.monotonic,
) -> JobStatus:
    """Wait (bounded) for the job's instance, start the job on it, return without waiting for the job.

    A job that cannot be started gets a failed manifest, so the stop function learns of it and the
    instance never keeps running for a job that will not come.
    """
    job = jobs.get(job_id)
    if job is None:
        raise PermanentError(f"job {job_id} is not in the job table")
    if job.status is not JobStatus.QUEUED:
        logger.info("job %s is already %s; nothing to dispatch", job_id, job.status.value)
        return job.status
    deadline = clock() + settings.instance_ready_timeout_seconds
    instance_id = job.instance_id
    if instance_id is None:
        raise PermanentError(f"job {job_id} was never placed on an instance")
    try:
        pool.ensure_running(instance_id, deadline, reason=f"job {job_id} waiting")
        if not jobs.transition(
            job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], instance_id=instance_id, count_attempt=True
        ):
            logger.info("job %s was claimed by another dispatch", job_id)
            return JobStatus.DISPATCHED
        launcher.launch(instance_id, job_spec(job, settings, instance_id), deadline)
    except BatchworkerError as exc:
        fail_job(job, str(exc), instance_id, settings, jobs, s3_client)
        return JobStatus.FAILED
    jobs.transition(
        job_id, JobStatus.RUNNING, allowed_from=[JobStatus.DISPATCHED], lease_seconds=settings.job_lease_seconds
    )
    return JobStatus.RUNNING


def job_spec(job: Job, settings: Settings, instance_id: str) -> dict:
    return {
        "job_id": job.job_id,
        "input": {"bucket": job.input_bucket, "key": job.input_key, "version_id": job.input_version},
        "output": {"bucket": settings.output_bucket, "prefix": output_prefix(job.job_id)},
        "model_uri": settings.model_uri,
        "instance_id": instance_id,
    }


def fail_job(job: Job, error: str, instance_id: str | None, settings: Settings, jobs: JobStore, s3_client) -> None:
    logger.error("job %s failed before it started: %s", job.job_id, error)
    jobs.transition(job.job_id, JobStatus.FAILED, allowed_from=ACTIVE_STATUSES, error=error)
    write_manifest(s3_client, settings.output_bucket, failed_manifest(job, error, instance_id))


def finish_job(
    manifest: dict,
    manifest_key: str,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    now: datetime | None = None,
) -> StopDecision | None:
    """Record the job's final status, then stop its instance if nothing else needs it."""
    job_id = manifest["job_id"]
    final = JobStatus.SUCCEEDED if manifest["status"] == "succeeded" else JobStatus.FAILED
    error = manifest.get("error") or None
    if not jobs.transition(job_id, final, allowed_from=ACTIVE_STATUSES, error=error, manifest_key=manifest_key):
        logger.info("job %s already finished (or unknown); status not changed", job_id)
    job = jobs.get(job_id)
    instance_id = (job.instance_id if job else None) or manifest.get("instance_id")
    if not instance_id:
        return None
    ledger.note_activity(instance_id, now)
    return stop_if_idle(instance_id, f"job {job_id} finished", settings, jobs, pool, ledger, now)


def stop_if_idle(
    instance_id: str,
    cause: str,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    now: datetime | None = None,
) -> StopDecision:
    """Stop the instance when `should_stop` says so and this caller wins the stop claim."""
    entry = ledger.read(instance_id)  # read before the jobs: an assignment after this voids the claim
    instance = pool.get(instance_id)
    decision = should_stop(
        now or utc_now(), instance, jobs.active(), settings.idle_grace_seconds, entry.last_activity_at
    )
    if decision.stop and not ledger.claim_stop(instance_id, entry.generation):
        decision = StopDecision(False, "a job was placed on it meanwhile, or another stop was claimed")
    logger.info("instance %s after %s: %s (%s)", instance_id, cause, "stop" if decision.stop else "keep", decision.reason)
    if decision.stop:
        pool.stop(instance_id, reason=f"{cause}; {decision.reason}")
    return decision
