"""The watchdog pass: fail lost or overlong jobs, re-dispatch stuck ones, stop idle instances."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from batchworker.capacity import CAPACITY_RETRY_INTERVAL_SECONDS
from batchworker.config import Settings
from batchworker.control import fail_job, finish_job, pool_grace_seconds, stop_when_idle
from batchworker.decisions import JobAction, judge_job
from batchworker.errors import RejectedEvent
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger, LedgerEntry
from batchworker.manifests import read_manifest
from batchworker.models import (
    ACTIVE_STATUSES,
    InstanceState,
    Job,
    JobStatus,
    manifest_key,
    parse_time,
    utc_now,
)

logger = logging.getLogger(__name__)


@dataclass
class ReapReport:
    failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # their manifest was there, its event not yet handled
    # queued on a running (or stopped) instance with no dispatcher: its state-change event was lost, or its
    # dispatcher ran out of time; a dispatcher is invoked for them again (no attempt counted)
    nudged: list[str] = field(default_factory=list)


LOST_EVENT_SECONDS = 120.0  # a job queued this long on a running or stopped instance, no dispatcher: nudge it


def reap(
    settings: Settings,
    jobs: JobStore,
    pool: InstancePool,
    ledger: InstanceLedger,
    s3_client,
    invoke_worker: Callable[[dict], None],
    now: datetime | None = None,
    gaps: IdleGaps | None = None,
) -> ReapReport:
    """One pass. It reads the pool once, its ledger entries in one batch (BatchGetItem), and the active
    jobs once, whatever the pool's size; only what it changes (a job failed, an instance stopped) costs more.
    """
    now = now or utc_now()
    report = ReapReport()
    instances = pool.list()
    entries = ledger.read_many(i.instance_id for i in instances)  # before the jobs: see stop_when_idle
    active = jobs.active()
    for job in active:
        verdict = judge_job(
            now, job, settings.max_job_runtime_seconds, settings.stuck_after_seconds, settings.max_attempts,
            settings.max_capacity_wait_seconds, CAPACITY_RETRY_INTERVAL_SECONDS,
        )
        if verdict.action is JobAction.KEEP:
            continue
        if job.attempts and _finish_from_manifest(job, settings, jobs, ledger, s3_client):
            # Done, its manifest's event still on its way (S3 events can take a minute or more): never run a
            # finished job again, nor overwrite its manifest with a failed one.
            report.finished.append(job.job_id)
        elif verdict.action is JobAction.FAIL:
            # The failed manifest reaches the stop function, which stops the instance if nothing else runs.
            fail_job(job, verdict.reason, job.instance_id, settings, jobs, s3_client)
            report.failed.append(job.job_id)
        elif verdict.action is JobAction.REDISPATCH:
            if jobs.transition(job.job_id, JobStatus.QUEUED, allowed_from=ACTIVE_STATUSES, count_retry=True):
                logger.warning("re-dispatching job %s: %s", job.job_id, verdict.reason)
                invoke_worker({"job_ids": [job.job_id]})
                report.redispatched.append(job.job_id)
    _nudge_forgotten(active, instances, entries, now, invoke_worker, report)
    ended = set(report.failed) | set(report.finished)
    still_active = [job for job in active if job.job_id not in ended]
    grace = pool_grace_seconds(settings, still_active, now, gaps)
    for instance in instances:
        entry = _release_ended_placements(entries[instance.instance_id], still_active, jobs, ledger)
        if instance.state is not InstanceState.RUNNING:
            continue
        if entry.is_stop_claimed:
            # Running although its stop was claimed: started by hand, or the stop call was lost. Adopt it
            # with a new generation so that this pass (or the next) can stop it.
            entry = replace(entry, generation=ledger.note_assignment(instance.instance_id, now), last_activity_at=now)
        decision = stop_when_idle(instance, entry, still_active, grace, "reaper pass", pool, ledger, now)
        if decision.stop:
            report.stopped.append(instance.instance_id)
    return report


def _nudge_forgotten(active, instances, entries, now, invoke_worker, report: ReapReport) -> None:
    """Invoke a dispatcher for jobs left QUEUED on an instance that no dispatcher holds and no event will wake:
    running (its `running` event was lost, or its dispatcher ran out of time) or stopped (a start refused while
    it was stopping, and its `stopped` event lost). The bounded fallback for a lost state-change event."""
    states = {i.instance_id: i.state for i in instances}
    handled = {*report.redispatched, *report.failed, *report.finished}
    forgotten: dict[str, list[str]] = {}
    for job in active:
        if (
            job.status is JobStatus.QUEUED and job.instance_id and job.capacity_wait_since is None
            and job.job_id not in handled
            and states.get(job.instance_id) in (InstanceState.RUNNING, InstanceState.STOPPED)
            and not entries[job.instance_id].is_dispatching(now.timestamp())
            and (now - parse_time(job.updated_at or job.created_at)).total_seconds() > LOST_EVENT_SECONDS
        ):
            forgotten.setdefault(job.instance_id, []).append(job.job_id)
    for instance_id, job_ids in forgotten.items():
        logger.warning("jobs %s wait on %s with no dispatcher; invoking one", job_ids, instance_id)
        invoke_worker({"job_ids": job_ids})
        report.nudged.extend(job_ids)


def _release_ended_placements(entry: LedgerEntry, active: list[Job], jobs: JobStore, ledger: InstanceLedger) -> LedgerEntry:
    """Repair the ledger's `placed` set: drop jobs that ended (or moved) without their manifest being recorded.

    Jobs active on this instance in the pass's snapshot are fine; only the others are read (strongly consistent),
    so a pass costs no more calls in the steady state however large the pool. A job not yet assigned (placed a
    moment ago: the ledger is written before the job row) is kept. Returns the entry without the released jobs.
    """
    on_it = {job.job_id for job in active if job.instance_id == entry.instance_id}
    ended = []
    for job_id in entry.placed_job_ids - on_it:
        job = jobs.get(job_id)  # strongly consistent
        if job is None or job.status.is_terminal or (job.instance_id and job.instance_id != entry.instance_id):
            ended.append(job_id)
    if not ended:
        return entry
    logger.warning("instance %s: releasing placements that ended unrecorded: %s", entry.instance_id, ended)
    ledger.release(entry.instance_id, ended)
    return replace(entry, placed_job_ids=entry.placed_job_ids - set(ended))


def _finish_from_manifest(job: Job, settings: Settings, jobs: JobStore, ledger: InstanceLedger, s3_client) -> bool:
    """Record the job's end from its manifest, if it wrote one; False when it has none."""
    key = manifest_key(job.job_id)
    try:
        manifest = read_manifest(s3_client, settings.output_bucket, key)
    except RejectedEvent:
        return False
    logger.warning("job %s had finished (%s); its manifest event had not arrived", job.job_id, manifest["status"])
    finish_job(manifest, key, jobs, ledger)
    return True
