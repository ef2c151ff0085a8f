"""The watchdog pass: fail lost or overlong jobs, re-dispatch stuck ones, stop idle instances."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from batchworker.capacity import CAPACITY_RETRY_INTERVAL_SECONDS
from batchworker.config import Settings
from batchworker.control import fail_job, stop_if_idle
from batchworker.decisions import JobAction, judge_job
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger, LedgerEntry
from batchworker.models import ACTIVE_STATUSES, InstanceState, JobStatus, utc_now

logger = logging.getLogger(__name__)


@dataclass
class ReapReport:
    failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


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
    now = now or utc_now()
    report = ReapReport()
    for job in jobs.active():
        verdict = judge_job(
            now, job, settings.max_job_runtime_seconds, settings.stuck_after_seconds, settings.max_attempts,
            settings.max_capacity_wait_seconds, CAPACITY_RETRY_INTERVAL_SECONDS,
        )
        if verdict.action is JobAction.FAIL:
            # The failed manifest reaches the stop function, which stops the instance if nothing else runs.
            fail_job(job, verdict.reason, job.instance_id, settings, jobs, s3_client)
            report.failed.append(job.job_id)
        elif verdict.action is JobAction.REDISPATCH:
            if jobs.transition(job.job_id, JobStatus.QUEUED, allowed_from=ACTIVE_STATUSES, count_retry=True):
                logger.warning("re-dispatching job %s: %s", job.job_id, verdict.reason)
                invoke_worker({"job_ids": [job.job_id]})
                report.redispatched.append(job.job_id)
    for instance in pool.list():
        entry = ledger.read(instance.instance_id)
        _release_ended_placements(entry, jobs, ledger)
        if instance.state is not InstanceState.RUNNING:
            continue
        if entry.is_stop_claimed:
            # Running although its stop was claimed: started by hand, or the stop call was lost. Adopt it
            # with a new generation so that this pass (or the next) can stop it.
            ledger.note_assignment(instance.instance_id, now)
        decision = stop_if_idle(instance.instance_id, "reaper pass", settings, jobs, pool, ledger, now, gaps)
        if decision.stop:
            report.stopped.append(instance.instance_id)
    return report


def _release_ended_placements(entry: LedgerEntry, jobs: JobStore, ledger: InstanceLedger) -> None:
    """Repair the ledger's `placed` set: drop jobs that ended (or moved) without their manifest being recorded.

    A job not yet assigned (placed a moment ago: the ledger is written before the job row) is kept.
    """
    ended = []
    for job_id in entry.placed_job_ids:
        job = jobs.get(job_id)  # strongly consistent
        if job is None or job.status.is_terminal or (job.instance_id and job.instance_id != entry.instance_id):
            ended.append(job_id)
    if ended:
        logger.warning("instance %s: releasing placements that ended unrecorded: %s", entry.instance_id, ended)
        ledger.release(entry.instance_id, ended)
