"""Pure decisions of the control plane, kept apart from their side effects."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from batchworker.models import Instance, InstanceState, Job, JobStatus, parse_time


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
    placed_job_ids: Iterable[str] = (),
) -> StopDecision:
    """Decide whether `instance` may be stopped now.

    The instance stays up while any of these holds:
    - it is not running (pending, stopping, stopped: nothing to stop now);
    - its ledger record lists a job placed on it whose manifest is not recorded yet (`placed_job_ids`, a
      strongly consistent read: the status index behind `active_jobs` can miss a job placed a moment ago);
    - a job is dispatched to it or running on it;
    - a job is queued for it, or queued and not yet placed on any instance (it will need one);
    - its last job finished less than `idle_grace_seconds` ago (work arriving right after is cheaper
      on a warm instance than after a new boot).
    Otherwise it stops.
    """
    if instance.state is not InstanceState.RUNNING:
        return StopDecision(False, f"instance is {instance.state.value}")
    if (kept := kept_for_placed_jobs(placed_job_ids)) is not None:
        return kept
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


def kept_for_placed_jobs(placed_job_ids: Iterable[str]) -> StopDecision | None:
    """Keep the instance while its ledger lists jobs placed on it (whatever its state); None when it lists none."""
    if placed := sorted(placed_job_ids):
        more = f" and {len(placed) - 1} more" if len(placed) > 1 else ""
        return StopDecision(False, f"job {placed[0]}{more} placed on it")
    return None


RECENT_GAPS = 20  # idle gaps the adaptive grace learns from (the system's record and the simulator)


def choose_grace_seconds(recent_gaps_seconds: list[float], cap_seconds: float, reboot_seconds: float) -> float:
    """The idle grace that would have cost least over the recent idle gaps (ski rental, empirical distribution).

    A gap is the time from the pool going idle to the next upload. Waiting `g` costs the gap itself when it
    is at most `g` (the instance was still up), else `g` plus a reboot. No history yet: `cap_seconds`.
    Isolated jobs (gaps far longer than a reboot) learn 0: stop at once; bursts learn to wait for the next file.
    """
    if not recent_gaps_seconds:
        return cap_seconds
    candidates = sorted({0.0, cap_seconds, *(gap for gap in recent_gaps_seconds if gap <= cap_seconds)})

    def cost(grace: float) -> float:
        return sum(gap if gap <= grace else grace + reboot_seconds for gap in recent_gaps_seconds)

    return min(candidates, key=lambda grace: (cost(grace), grace))


def idle_grace_seconds(
    policy: str, cap_seconds: float, recent_gaps_seconds: list[float], reboot_seconds: float
) -> float:
    """How long an idle instance waits for more work: `fixed` is the cap; `adaptive` learns it (at most the cap)."""
    if policy == "fixed":
        return cap_seconds
    return choose_grace_seconds(recent_gaps_seconds, cap_seconds, reboot_seconds)



class JobAction(str, Enum):
    KEEP = "keep"
    REDISPATCH = "redispatch"
    FAIL = "fail"


@dataclass(frozen=True)
class JobVerdict:
    action: JobAction
    reason: str


def judge_job(
    now: datetime,
    job: Job,
    max_job_runtime_seconds: float,
    stuck_after_seconds: float,
    max_attempts: int,
    max_capacity_wait_seconds: float | None = None,
    capacity_retry_interval_seconds: float = 60.0,
) -> JobVerdict:
    """What the reaper does with an active job.

    Waiting is not running: the runtime counts from `running_since`, which the job sets when its code starts;
    a job waiting on its instance for a slot (DISPATCHED, its lease renewed) is kept however long it waits.
    - running past `max_job_runtime_seconds`: fail it (the cap protects the bill from a hung job);
    - running or waiting on its instance with a lease that expired (its instance was stopped or lost, or the
      job died): dispatch it again, or fail it once it has had `max_attempts` dispatches;
    - queued waiting for EC2 capacity (no instance of the pool could start): fail it once it has waited
      `max_capacity_wait_seconds`, else dispatch it again every `capacity_retry_interval_seconds` (capacity
      comes back; a wait counts no attempt);
    - queued, or dispatched without a lease yet, for longer than `stuck_after_seconds`: dispatch it again,
      or fail it once it has had `max_attempts` dispatches;
    - anything else: keep.
    """
    if job.status is JobStatus.RUNNING and job.running_since:
        running_seconds = (now - parse_time(job.running_since)).total_seconds()
        if running_seconds > max_job_runtime_seconds:
            return JobVerdict(
                JobAction.FAIL,
                f"the job ran {running_seconds:.0f}s, past the {max_job_runtime_seconds:.0f}s maximum "
                "runtime; split the input or raise max_job_runtime_seconds",
            )
    if job.status in (JobStatus.RUNNING, JobStatus.DISPATCHED) and job.lease_expires_at:
        if now > parse_time(job.lease_expires_at):
            # An instance lost mid-job is transient: run it again, up to max_attempts.
            if job.attempts < max_attempts:
                return JobVerdict(JobAction.REDISPATCH, "its lease expired (instance stopped or lost, job died)")
            if job.instance_problem:  # the job's network check said why (worker/connectivity.py); first, so
                # that a narrow `status` NOTE column shows it
                return JobVerdict(
                    JobAction.FAIL,
                    f"its instance reported: {job.instance_problem}. The job stopped reporting progress "
                    f"{job.attempts} time(s); upload the file again once the route is there",
                )
            return JobVerdict(
                JobAction.FAIL,
                f"the job stopped reporting progress {job.attempts} time(s) (its instance was stopped or lost, "
                "or the job process died); upload the file again to retry",
            )
        if job.status is JobStatus.RUNNING:
            return JobVerdict(JobAction.KEEP, "running")
        return JobVerdict(JobAction.KEEP, "waiting on its instance for a slot")
    if job.status is JobStatus.QUEUED and job.capacity_wait_since and max_capacity_wait_seconds is not None:
        short_seconds = (now - parse_time(job.capacity_wait_since)).total_seconds()
        if short_seconds > max_capacity_wait_seconds:
            reason = (job.waiting_reason or "").removeprefix("waiting for capacity: ")
            return JobVerdict(
                JobAction.FAIL,
                f"no GPU capacity for {short_seconds:.0f}s ({reason or 'InsufficientInstanceCapacity'}); the job "
                "never started. Upload the file again later, add subnets in other Availability Zones "
                "(subnet_ids), or raise max_capacity_wait_seconds",
            )
        since_try = (now - parse_time(job.updated_at or job.capacity_wait_since)).total_seconds()
        if since_try > capacity_retry_interval_seconds:
            return JobVerdict(JobAction.REDISPATCH, f"waiting for capacity for {short_seconds:.0f}s; trying again")
        return JobVerdict(JobAction.KEEP, f"waiting for capacity for {short_seconds:.0f}s")
    if job.status in (JobStatus.QUEUED, JobStatus.DISPATCHED):
        waited_seconds = (now - parse_time(job.updated_at or job.created_at)).total_seconds()
        if waited_seconds <= stuck_after_seconds:
            return JobVerdict(JobAction.KEEP, f"{job.status.value.lower()} for {waited_seconds:.0f}s")
        if job.attempts >= max_attempts:
            return JobVerdict(
                JobAction.FAIL,
                f"the job could not be started after {job.attempts} attempts; check `batchworker status` "
                "for the instance and the worker function's logs",
            )
        return JobVerdict(JobAction.REDISPATCH, f"{job.status.value.lower()} for {waited_seconds:.0f}s")
    return JobVerdict(JobAction.KEEP, job.status.value.lower())


@dataclass(frozen=True)
class Placement:
    instance_id: str
    start: bool
    reason: str
    over_limit: bool = False  # every instance is full: the job goes past max_jobs_per_instance and waits for a slot


def place_job(instances: Iterable[Instance], load: Mapping[str, int], max_jobs_per_instance: int) -> Placement | None:
    """Where a new job goes, given the pool and each instance's job count (`load`, the size of its ledger's
    `placed` set; missing is 0).

    - an instance that is up (running or pending) with a free slot, least loaded first;
    - else a stopped instance with a free slot, to be started (the queue is deeper than the running capacity);
    - else a stopping instance with a free slot (the worker waits for it to stop and starts it again);
    - else, every instance full, the least loaded one that is up, stopping or stopped, in that order
      (`over_limit`: the job waits for a slot there).
    No instance gets more than `max_jobs_per_instance` while another is free or can be started. None when the
    pool is empty.
    """
    instances = list(instances)
    count = {i.instance_id: load.get(i.instance_id, 0) for i in instances}

    def least_loaded(candidates: Iterable[Instance]) -> list[Instance]:
        return sorted(candidates, key=lambda i: (count[i.instance_id], i.state is not InstanceState.RUNNING, i.instance_id))

    up = least_loaded(i for i in instances if i.state.is_up)
    stopped = least_loaded(i for i in instances if i.state is InstanceState.STOPPED)
    stopping = least_loaded(i for i in instances if i.state is InstanceState.STOPPING)
    free = [i for i in up if count[i.instance_id] < max_jobs_per_instance]
    if free:
        return Placement(free[0].instance_id, False, f"{count[free[0].instance_id]} job(s) already there")
    if free := [i for i in stopped if count[i.instance_id] < max_jobs_per_instance]:
        return Placement(free[0].instance_id, True, "every running instance is full" if up else "no instance is up")
    if free := [i for i in stopping if count[i.instance_id] < max_jobs_per_instance]:
        return Placement(free[0].instance_id, False, "the instances that are up are full; this one is stopping and "
                         "will be started again")
    for group, start in ((up, False), (stopping, False), (stopped, True)):
        if group:
            return Placement(group[0].instance_id, start, "every instance is full; the job waits for a slot",
                             over_limit=True)
    return None
