"""The control plane's three steps, one per Lambda: accept an upload, dispatch a job, finish a job."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from botocore.exceptions import ClientError

from batchworker.capacity import start_somewhere, wait_for_capacity
from batchworker.config import Settings
from batchworker.decisions import StopDecision, idle_grace_seconds, kept_for_placed_jobs, should_stop
from batchworker.errors import (
    BatchworkerError,
    InstanceReadyTimeout,
    InsufficientCapacity,
    NoInstanceAvailable,
    RejectedEvent,
    RetryableError,
)
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import CAPACITY_ERROR, TRANSIENT_START_ERRORS, InstancePool
from batchworker.jobpkg.registry import PackageRegistry
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger, LedgerEntry
from batchworker.manifests import failed_manifest, write_manifest
from batchworker.models import (
    ACTIVE_STATUSES,
    POOL_TAG_KEY,
    Instance,
    InstanceState,
    Job,
    JobStatus,
    job_id_for,
    output_prefix,
    utc_now,
)
from batchworker.placement import Placer
from batchworker.routing import PackageLookup, UploadRefused, route_upload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One ObjectCreated record, key already URL-decoded."""

    bucket: str
    key: str
    size_bytes: int | None = None
    etag: str | None = None
    version_id: str | None = None
    # S3 user metadata of the object (lowercase keys without x-amz-meta-): `param-<name>` job parameters.
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return job_id_for(self.bucket, self.key, self.version_id or self.etag)


class Launcher(Protocol):
    max_spec_bytes: int  # the largest job spec one command can carry

    def launch(self, instance_id: str, spec: dict, deadline: float) -> dict: ...


def accept_upload(
    upload: Upload,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    dispatch: Callable[[str, str], None],
    s3_client,
    placer: Placer | None = None,
    packages: PackageLookup | None = None,
) -> str | None:
    """Record the job, place it on an instance (starting one if needed), hand it to `dispatch(job_id, instance_id)`.

    The upload is routed first: a key under `<name>/` of a deployed package, or any key when `default_job` is
    set, is pinned to that package's current version and resolved parameters (with no default_job, other keys
    are refused). An input over `max_input_bytes`, an extension the package does not accept, a bad
    parameter or a missing package fail at once with a manifest: no GPU starts for them. A `placer` and
    `packages` shared by the uploads of one batch read the pool, its load and each package once for all.
    Returns the job id, or None when this delivery is a duplicate of a job already under way.
    """
    if upload.bucket != settings.input_bucket:
        raise RejectedEvent(f"event from bucket {upload.bucket!r}; only {settings.input_bucket!r} makes jobs")
    if not upload.key or upload.key.endswith("/"):
        raise RejectedEvent(f"key {upload.key!r} is a folder marker, not a file")
    route, refusal = None, None
    packages = packages or PackageLookup(PackageRegistry(settings.artifacts_bucket, s3_client))
    try:
        route = route_upload(upload.key, upload.metadata, settings.default_job, packages)
    except UploadRefused as exc:
        refusal = str(exc)
    job = Job(
        job_id=upload.job_id,
        status=JobStatus.QUEUED,
        input_bucket=upload.bucket,
        input_key=upload.key,
        input_version=upload.version_id,
        input_size_bytes=upload.size_bytes,
        package=route.package.to_spec() if route else None,
        params=route.params if route else None,
    )
    if not jobs.create_queued(job):
        existing = jobs.get(job.job_id)
        if existing is not None and existing.status is not JobStatus.QUEUED:
            logger.info("duplicate delivery of job %s (%s); ignored", job.job_id, existing.status.value)
            return None
        if existing is not None and existing.instance_id:
            # Still QUEUED: an earlier delivery may have died before invoking the worker. Dispatching
            # again is safe: the worker claims each job with a conditional write.
            dispatch(job.job_id, existing.instance_id)
            return job.job_id
    if upload.size_bytes is not None and upload.size_bytes > settings.max_input_bytes:
        fail_job(
            job,
            f"the input is {upload.size_bytes} bytes, over the {settings.max_input_bytes}-byte limit; "
            "split it into smaller files (or raise max_input_bytes)",
            None, settings, jobs, s3_client,
        )
        return job.job_id
    if refusal is not None:
        fail_job(job, refusal, None, settings, jobs, s3_client)
        return job.job_id
    placer = placer or Placer(pool.list(), ledger, settings.max_jobs_per_instance)
    # The placement goes into the instance's ledger record first (a conditional write: never past the limit while
    # another instance has room), which bumps its generation: a stop decided before this point can no longer be
    # claimed, and stop decisions read the record strongly consistent.
    placement = placer.place(job.job_id)
    if placement is None:
        raise NoInstanceAvailable(
            f"no instance carries tag {POOL_TAG_KEY}={settings.pool_tag}; run `terraform apply` to create the pool"
        )
    jobs.assign_instance(job.job_id, placement.instance_id)
    if placement.start and pool.try_start(placement.instance_id, reason=f"job {job.job_id} queued; {placement.reason}"):
        note_start(ledger, placement.instance_id, job)
    dispatch(job.job_id, placement.instance_id)
    logger.info("job %s placed on %s (%s)", job.job_id, placement.instance_id, placement.reason)
    return job.job_id


def note_start(ledger: InstanceLedger, instance_id: str, job: Job) -> None:
    """Tell the instance's boot-time pre-warm which job package started it. After the start, off its path
    (the instance boots for far longer than this write takes); best effort: without it the job sets its
    package up itself."""
    packages = {job.package["name"]: job.package["version"]} if job.package else {}
    try:
        ledger.note_start(instance_id, packages)
    except ClientError as exc:
        logger.warning("could not record the packages that started %s for its pre-warm: %s", instance_id, exc)


def dispatch_jobs(
    job_ids: list[str],
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    launcher: Launcher,
    s3_client,
    ledger: InstanceLedger,
    clock: Callable[[], float] = time.monotonic,
    owner: str | None = None,
    claim_seconds: float | None = None,
) -> dict[str, JobStatus]:
    """Start each job on its instance, in as few commands as fit, as the instance's one dispatcher.

    A burst shares its instance start and its commands: the jobs of one instance travel together as one
    batch spec. This invocation first claims each instance (`dispatch_instance`): if another dispatcher
    holds it, the jobs are handed over to that one and this returns at once, their status QUEUED.
    A job that cannot be started gets a failed manifest, so the stop function learns of it and the instance
    never keeps running for a job that will not come. A lack of EC2 capacity is not such a failure: the jobs
    move to an instance in another AZ, or stay QUEUED waiting for capacity (batchworker/capacity.py).
    """
    outcome: dict[str, JobStatus] = {}
    by_instance: dict[str, list[Job]] = {}
    for job_id in dict.fromkeys(job_ids):
        job = jobs.get(job_id)
        if job is None:
            logger.warning("job %s is not in the job table; skipped", job_id)
            continue
        if job.status is not JobStatus.QUEUED:
            logger.info("job %s is already %s; nothing to dispatch", job_id, job.status.value)
            outcome[job_id] = job.status
        elif job.instance_id is None:
            fail_job(job, "the job was never placed on an instance", None, settings, jobs, s3_client)
            outcome[job_id] = JobStatus.FAILED
        else:
            by_instance.setdefault(job.instance_id, []).append(job)
    for instance_id, group in by_instance.items():
        outcome.update(dispatch_instance(
            instance_id, settings, jobs, pool, launcher, s3_client, ledger, group, clock, owner, claim_seconds
        ))
    return outcome


def dispatch_instance(
    instance_id: str,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    launcher: Launcher,
    s3_client,
    ledger: InstanceLedger,
    group: Sequence[Job] = (),
    clock: Callable[[], float] = time.monotonic,
    owner: str | None = None,
    claim_seconds: float | None = None,
) -> dict[str, JobStatus]:
    """Launch the jobs waiting on one instance as its one dispatcher, or hand `group` over to the one there.

    No storm of dispatchers: one invocation at a time holds the instance (its ledger claim, lapsing after
    `claim_seconds`); the others hand their jobs over and return. The holder launches every job QUEUED on the
    instance (its `group` and the ledger's `placed`), and lets go only when nothing was placed or handed over
    meanwhile; otherwise it looks again. `group` may be empty: an instance state-change event names no job.
    """
    owner = owner or uuid.uuid4().hex
    claim_seconds = claim_seconds or default_claim_seconds(settings)
    entry = ledger.claim_dispatch(instance_id, owner, claim_seconds, [job.job_id for job in group])
    if entry is None:
        logger.info("instance %s has a dispatcher already; %d job(s) handed over to it", instance_id, len(group))
        return {job.job_id: JobStatus.QUEUED for job in group}
    outcome: dict[str, JobStatus] = {}
    gives_up_at = clock() + claim_seconds - CLAIM_MARGIN_SECONDS
    hinted = [job.job_id for job in group]
    try:
        while True:
            waiting = [
                job for job in jobs.get_many([*hinted, *entry.placed_job_ids]).values()
                if job.status is JobStatus.QUEUED and job.instance_id == instance_id
            ]
            if waiting:
                outcome.update(_dispatch_to(instance_id, waiting, settings, jobs, pool, launcher, s3_client, clock, ledger))
            hinted = []
            if clock() >= gives_up_at:
                # What is still queued here waits for the reaper, which invokes a dispatcher again.
                logger.warning("dispatcher of %s out of time; letting go of the instance", instance_id)
                ledger.drop_dispatch(instance_id, owner)
                break
            entry = ledger.release_dispatch(instance_id, owner, entry.generation)
            if entry is None:
                break
            if entry.dispatcher != owner:
                logger.warning("dispatch claim on %s lapsed; %s dispatches there now", instance_id, entry.dispatcher)
                break
            logger.info("jobs were placed on %s meanwhile; looking again", instance_id)
    except BaseException:
        ledger.drop_dispatch(instance_id, owner)
        raise
    return outcome


CLAIM_MARGIN_SECONDS = 30.0  # a dispatcher lets go this long before its claim would lapse


def default_claim_seconds(settings: Settings) -> float:
    """How long a dispatcher may hold an instance: one bounded wait for it, one launch, and a margin."""
    return settings.instance_ready_timeout_seconds + settings.dispatch_command_timeout_seconds + 2 * CLAIM_MARGIN_SECONDS


def _dispatch_to(instance_id, group, settings, jobs, pool, launcher, s3_client, clock, ledger) -> dict[str, JobStatus]:
    deadline = clock() + settings.instance_ready_timeout_seconds
    claimed: list[Job] = []
    group = list(group)
    launched: set[str] = set()
    try:
        state = _state_for_events(instance_id, group, pool) if settings.instance_state_events else None
        if state is not None and state is not InstanceState.RUNNING:
            return {job.job_id: JobStatus.QUEUED for job in group}  # its state-change event brings a dispatcher
        if state is None:
            instance_id = start_somewhere(instance_id, group, deadline, jobs, pool, ledger, settings.max_jobs_per_instance)
        for job in group:
            # The conditional claim makes a retried or duplicated invocation start each job once.
            if jobs.transition(
                job.job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], instance_id=instance_id,
                count_attempt=True,
            ):
                claimed.append(job)
        for batch in batches(claimed, settings, instance_id, launcher.max_spec_bytes):
            spec = {"jobs": [job_spec(job, settings, instance_id) for job in batch]}
            _launch_until(deadline, instance_id, spec, pool, launcher, clock)
            for job in batch:
                launched.add(job.job_id)
                # On the instance now: DISPATCHED with a lease while it waits for a slot; the job itself turns
                # RUNNING when its code starts (waiting is not running). Already RUNNING or done: left alone.
                jobs.transition(
                    job.job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.DISPATCHED],
                    lease_seconds=settings.job_lease_seconds,
                )
    except InsufficientCapacity as exc:
        wait_for_capacity(group, exc, jobs)
    except BatchworkerError as exc:
        for job in claimed or group:
            if job.job_id in launched:
                continue  # on the instance already; its lease tells whether it lives
            current = jobs.get(job.job_id)
            if current is not None and current.status in (JobStatus.QUEUED, JobStatus.DISPATCHED):
                fail_job(job, str(exc), instance_id, settings, jobs, s3_client)
    final = {}
    for job in group:
        current = jobs.get(job.job_id)
        final[job.job_id] = current.status if current else JobStatus.FAILED
    return final


def _state_for_events(instance_id: str, group: list[Job], pool: InstancePool) -> InstanceState | None:
    """With state-change events, never wait through a boot. Returns RUNNING (launch now), another state (the jobs
    stay QUEUED: the instance's state-change event brings a dispatcher), or None (wait the old way).

    Pending: its `running` event brings one. Stopping: its `stopped` event does, which starts it. Stopped: start it,
    then as pending. A start refused for EC2 capacity: None, and the waiting path moves the jobs to another AZ or
    keeps them waiting for capacity (batchworker/capacity.py).
    """
    instance = pool.get(instance_id)
    if instance.state is InstanceState.STOPPED:
        try:
            pool.start(instance_id, reason=f"{len(group)} job(s) waiting")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == CAPACITY_ERROR:
                return None
            if code not in TRANSIENT_START_ERRORS:
                raise
            logger.info("start of %s refused for now (%s); its state-change event brings a dispatcher", instance_id, code)
            return InstanceState.STOPPING
        logger.info("started %s: %d job(s) wait for its running event", instance_id, len(group))
        return InstanceState.PENDING
    if instance.state is not InstanceState.RUNNING:
        logger.info("instance %s is %s: %d job(s) wait for its state-change event", instance_id,
                    instance.state.value, len(group))
    return instance.state


def _launch_until(deadline: float, instance_id: str, spec: dict, pool, launcher, clock) -> dict:
    """Launch, and launch again after a transient cut-off (the instance stopped under the command).

    A relaunch cannot run a job twice: a job still running on the instance answers `already_running`.
    """
    while True:
        try:
            return launcher.launch(instance_id, spec, deadline)
        except RetryableError as exc:
            if clock() >= deadline:
                raise InstanceReadyTimeout(f"could not launch on instance {instance_id} in time: {exc}") from exc
            logger.warning("launch on %s interrupted (%s); starting the instance again if needed", instance_id, exc)
            pool.ensure_running(instance_id, deadline, reason="relaunch after an interrupted launch")


def batches(claimed: list[Job], settings: Settings, instance_id: str, max_spec_bytes: int) -> list[list[Job]]:
    """Split jobs into batch specs that each fit the transport's payload limit."""
    result: list[list[Job]] = []
    current: list[Job] = []
    size = len('{"jobs": []}')
    for job in claimed:
        job_size = len(json.dumps(job_spec(job, settings, instance_id))) + 2
        if current and size + job_size > max_spec_bytes:
            result.append(current)
            current, size = [], len('{"jobs": []}')
        current.append(job)
        size += job_size
    if current:
        result.append(current)
    return result


def job_spec(job: Job, settings: Settings, instance_id: str) -> dict:
    spec = {
        "job_id": job.job_id,
        "input": {"bucket": job.input_bucket, "key": job.input_key, "version_id": job.input_version},
        "output": {"bucket": settings.output_bucket, "prefix": output_prefix(job.job_id)},
        "instance_id": instance_id,
        # The job renews this lease while it runs; the reaper fails jobs whose lease expires.
        "lease": {"table": settings.jobs_table, "seconds": settings.job_lease_seconds},
        "max_concurrent_jobs": settings.max_jobs_per_instance,
        # The instance kills the job at its cap (worker/runtime_cap.py); the reaper's check is the backstop.
        "max_runtime_seconds": settings.max_job_runtime_seconds,
    }
    if job.package:
        # Pinned when the upload was accepted; the instance fetches this exact archive.
        spec["package"] = dict(job.package)
        spec["params"] = dict(job.params or {})
    return spec


def fail_job(job: Job, error: str, instance_id: str | None, settings: Settings, jobs: JobStore, s3_client) -> bool:
    """Fail the job with a control-plane manifest, unless a manifest ended it first; True when this one did.

    The manifest goes first and only once (a conditional write): a job still running past its cap cannot
    write "succeeded" over it later, and the table never says FAILED beside a "succeeded" manifest.
    """
    if write_manifest(s3_client, settings.output_bucket, failed_manifest(job, error, instance_id)) is None:
        logger.warning("job %s already has a manifest; it decides the job's status, not: %s", job.job_id, error)
        return False
    logger.error("job %s failed by the control plane: %s", job.job_id, error)
    jobs.transition(job.job_id, JobStatus.FAILED, allowed_from=ACTIVE_STATUSES, error=error)
    return True


def finish_job(
    manifest: dict,
    manifest_key: str,
    jobs: JobStore,
    ledger: InstanceLedger,
    now: datetime | None = None,
) -> str | None:
    """Record the job's final status; return the instance it ran on (for `stop_if_idle`), if any."""
    job_id = manifest["job_id"]
    final = JobStatus.SUCCEEDED if manifest["status"] == "succeeded" else JobStatus.FAILED
    error = manifest.get("error") or None
    # The manifest is written once, so it is the final word: a table that says otherwise follows it.
    other_final = JobStatus.FAILED if final is JobStatus.SUCCEEDED else JobStatus.SUCCEEDED
    if not jobs.transition(
        job_id, final, allowed_from=[*ACTIVE_STATUSES, other_final], error=error, manifest_key=manifest_key
    ):
        logger.info("job %s already %s (or unknown); status not changed", job_id, final.value)
    job = jobs.get(job_id)
    instance_id = (job.instance_id if job else None) or manifest.get("instance_id")
    if instance_id:
        ledger.note_activity(instance_id, now, job_ids=[job_id])
    return instance_id


def stop_if_idle(
    instance_id: str,
    cause: str,
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    now: datetime | None = None,
    gaps: IdleGaps | None = None,
) -> StopDecision:
    """Stop the instance when `should_stop` says so and this caller wins the stop claim.

    With `gaps`, an idle pool opens a gap there and the adaptive grace learns from the recent ones.
    """
    now = now or utc_now()
    # Strongly consistent, and read before the jobs: an assignment after this voids the claim, and every job
    # placed before it is in entry.placed_job_ids, whatever the (eventually consistent) status index shows.
    entry = ledger.read(instance_id)
    if (kept := kept_for_placed_jobs(entry.placed_job_ids)) is not None:
        # Work is placed on it: kept, whatever the pool or the index say; neither is read (the busy case).
        logger.info("instance %s after %s: keep (%s)", instance_id, cause, kept.reason)
        return kept
    instance = pool.get(instance_id)
    active = jobs.active_in_index()  # statuses and instances are all the decision needs (no lease)
    return stop_when_idle(instance, entry, active, pool_grace_seconds(settings, active, now, gaps), cause, pool, ledger, now)


def pool_grace_seconds(settings: Settings, active: list[Job], now: datetime, gaps: IdleGaps | None) -> float:
    """The idle grace now; with `gaps`, an idle pool opens a gap there and the adaptive grace learns from them."""
    if gaps is not None and not active:
        gaps.note_idle(now)
    learns = gaps is not None and settings.idle_grace_policy == "adaptive" and settings.idle_grace_seconds > 0
    return idle_grace_seconds(
        settings.idle_grace_policy,
        settings.idle_grace_seconds,
        gaps.recent() if learns else [],
        settings.restart_cost_seconds,
    )


def stop_when_idle(
    instance: Instance,
    entry: LedgerEntry,
    active: list[Job],
    grace_seconds: float,
    cause: str,
    pool: InstancePool,
    ledger: InstanceLedger,
    now: datetime,
) -> StopDecision:
    """Stop the instance when `should_stop` says so and the claim on `entry`'s generation wins.

    `entry` must have been read (strongly consistent) before `active`: a job placed in between bumps the
    generation and voids the claim, and every job placed before is in `entry.placed_job_ids`.
    """
    decision = should_stop(now, instance, active, grace_seconds, entry.last_activity_at, entry.placed_job_ids)
    if decision.stop and not ledger.claim_stop(instance.instance_id, entry.generation):
        decision = StopDecision(False, "a job was placed on it meanwhile, or another stop was claimed")
    logger.info(
        "instance %s after %s: %s (%s)", instance.instance_id, cause, "stop" if decision.stop else "keep", decision.reason
    )
    if decision.stop:
        pool.stop(instance.instance_id, reason=f"{cause}; {decision.reason}")
    return decision
