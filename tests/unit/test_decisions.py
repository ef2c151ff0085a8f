"""should_stop: every condition that keeps an instance up, table-driven."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from batchworker.decisions import JobAction, Placer, StopDecision, judge_job, place_job, should_stop
from batchworker.models import Instance, InstanceState, Job, JobStatus

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
ME, OTHER = "i-me", "i-other"


def job(status, instance_id=ME, job_id="j-0000000000000001"):
    return Job(job_id, status, "in", "key", instance_id=instance_id)


@pytest.mark.parametrize(
    ("state", "jobs", "grace", "finished_ago", "expected_stop", "reason_part"),
    [
        (InstanceState.RUNNING, [], 0, None, True, "no queued or running job"),
        (InstanceState.STOPPED, [], 0, None, False, "stopped"),
        (InstanceState.PENDING, [], 0, None, False, "pending"),
        (InstanceState.STOPPING, [], 0, None, False, "stopping"),
        (InstanceState.RUNNING, [job(JobStatus.RUNNING)], 0, None, False, "running on it"),
        (InstanceState.RUNNING, [job(JobStatus.DISPATCHED)], 0, None, False, "dispatched on it"),
        (InstanceState.RUNNING, [job(JobStatus.QUEUED)], 0, None, False, "queued"),
        (InstanceState.RUNNING, [job(JobStatus.QUEUED, instance_id=None)], 0, None, False, "queued"),
        (InstanceState.RUNNING, [job(JobStatus.QUEUED, instance_id=OTHER)], 0, None, True, "no queued"),
        (InstanceState.RUNNING, [job(JobStatus.RUNNING, instance_id=OTHER)], 0, None, True, "no queued"),
        (InstanceState.RUNNING, [], 120, 30, False, "grace"),
        (InstanceState.RUNNING, [], 120, 300, True, "no queued"),
        (InstanceState.RUNNING, [], 0, 1, True, "no queued"),
    ],
)
def test_should_stop(state, jobs, grace, finished_ago, expected_stop, reason_part):
    finished_at = NOW - timedelta(seconds=finished_ago) if finished_ago is not None else None
    decision = should_stop(NOW, Instance(ME, state), jobs, grace, finished_at)
    assert decision.stop is expected_stop
    assert reason_part in decision.reason


def test_a_placement_in_the_ledger_keeps_the_instance_up_whatever_the_index_shows():
    # the status index (active_jobs) has not caught up with the placement yet: only the ledger knows
    decision = should_stop(NOW, Instance(ME, InstanceState.RUNNING), [], 0, None, {"j-0000000000000002"})
    assert decision == StopDecision(False, "job j-0000000000000002 placed on it")
    two = should_stop(NOW, Instance(ME, InstanceState.RUNNING), [], 0, None, {"j-2", "j-1"})
    assert two.reason == "job j-1 and 1 more placed on it"
    assert should_stop(NOW, Instance(ME, InstanceState.STOPPED), [], 0, None, {"j-1"}).reason == "instance is stopped"


def inst(instance_id, state):
    return Instance(instance_id, state)


@pytest.mark.parametrize(
    ("instances", "jobs", "limit", "expected"),
    [
        ([], [], 2, None),
        ([inst("a", InstanceState.STOPPED)], [], 2, ("a", True)),
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.STOPPED)], [], 2, ("a", False)),
        # the running one is full: start another
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.STOPPED)],
         [job(JobStatus.RUNNING, "a"), job(JobStatus.QUEUED, "a")], 2, ("b", True)),
        # least loaded of the running ones
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.RUNNING)], [job(JobStatus.RUNNING, "a")], 2,
         ("b", False)),
        # a pending instance counts as up: a burst shares one start
        ([inst("a", InstanceState.PENDING), inst("b", InstanceState.STOPPED)], [job(JobStatus.QUEUED, "a")], 4,
         ("a", False)),
        # everything full and nothing to start: wait on the least loaded
        ([inst("a", InstanceState.RUNNING)], [job(JobStatus.RUNNING, "a"), job(JobStatus.RUNNING, "a")], 2,
         ("a", False)),
        # only a stopping instance: place it there, the worker restarts it
        ([inst("a", InstanceState.STOPPING)], [], 2, ("a", False)),
        # finished jobs do not count as load
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.STOPPED)], [job(JobStatus.SUCCEEDED, "a")] * 0, 1,
         ("a", False)),
    ],
)
def test_place_job(instances, jobs, limit, expected):
    placement = place_job(instances, jobs, limit)
    assert (None if placement is None else (placement.instance_id, placement.start)) == expected


def test_placer_shares_one_start_per_burst_and_spreads_over_the_pool():
    pool = [inst("a", InstanceState.STOPPED), inst("b", InstanceState.STOPPED)]
    placer = Placer(pool, [], max_jobs_per_instance=2)
    placements = [placer.place(job(JobStatus.QUEUED, None, f"j-{n:016x}")) for n in range(5)]
    assert [(p.instance_id, p.start) for p in placements] == [
        ("a", True), ("a", False),  # the burst shares a's start until a is full
        ("b", True), ("b", False),  # then the queue is deeper than a's capacity: start b
        ("a", False),  # everything full: wait on the least loaded
    ]


def at(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("status", "fields", "expected", "reason_part"),
    [
        # the cap counts from the job's own start
        (JobStatus.RUNNING, {"running_since": at(150), "lease_expires_at": at(-60)}, JobAction.FAIL, "maximum"),
        (JobStatus.RUNNING, {"running_since": at(50), "lease_expires_at": at(-60)}, JobAction.KEEP, "running"),
        # waiting on the instance for a slot, however long, with a live lease: not running, not stuck
        (JobStatus.DISPATCHED, {"lease_expires_at": at(-60), "updated_at": at(5000)}, JobAction.KEEP, "waiting"),
        # a lapsed lease, waiting or running: the instance or the job was lost
        (JobStatus.DISPATCHED, {"lease_expires_at": at(5)}, JobAction.REDISPATCH, "lease expired"),
        (JobStatus.RUNNING, {"running_since": at(10), "lease_expires_at": at(5)}, JobAction.REDISPATCH, "lease"),
        (JobStatus.RUNNING, {"running_since": at(10), "lease_expires_at": at(5), "attempts": 3}, JobAction.FAIL,
         "stopped reporting"),
        # ... and when its instance said what it cannot reach (the job's network check), the failure says so
        (JobStatus.DISPATCHED, {"lease_expires_at": at(5), "attempts": 3, "instance_problem": "cannot reach S3 (x)"},
         JobAction.FAIL, "its instance reported: cannot reach S3 (x)"),
        # dispatched without a lease (never launched): the stuck rule
        (JobStatus.DISPATCHED, {"updated_at": at(30)}, JobAction.KEEP, "dispatched for"),
        (JobStatus.DISPATCHED, {"updated_at": at(500)}, JobAction.REDISPATCH, "dispatched for"),
        (JobStatus.QUEUED, {"updated_at": at(500), "attempts": 3}, JobAction.FAIL, "could not be started"),
    ],
)
def test_judge_job(status, fields, expected, reason_part):
    verdict = judge_job(NOW, replace(job(status), **fields), 100, 300, 3)
    assert verdict.action is expected and reason_part in verdict.reason
