"""should_stop: every condition that keeps an instance up, table-driven."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from batchworker.decisions import (
    JobAction,
    StopDecision,
    judge_job,
    kept_for_placed_jobs,
    place_job,
    should_stop,
)
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
    # the stop function's shortcut (it then reads neither the pool nor the index) says the same
    assert kept_for_placed_jobs({"j-2", "j-1"}) == two
    assert kept_for_placed_jobs(set()) is None


def inst(instance_id, state):
    return Instance(instance_id, state)


@pytest.mark.parametrize(
    ("instances", "load", "limit", "expected"),
    [
        ([], {}, 2, None),
        ([inst("a", InstanceState.STOPPED)], {}, 2, ("a", True, False)),
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.STOPPED)], {}, 2, ("a", False, False)),
        # the running one is full: start another
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.STOPPED)], {"a": 2}, 2, ("b", True, False)),
        # least loaded of the running ones
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.RUNNING)], {"a": 1}, 2, ("b", False, False)),
        # a pending instance counts as up: a burst shares one start
        ([inst("a", InstanceState.PENDING), inst("b", InstanceState.STOPPED)], {"a": 1}, 4, ("a", False, False)),
        # everything full and nothing to start: wait on the least loaded, past the limit
        ([inst("a", InstanceState.RUNNING)], {"a": 2}, 2, ("a", False, True)),
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.RUNNING)], {"a": 3, "b": 2}, 2,
         ("b", False, True)),
        # a stopped instance full of jobs (waiting for capacity, say) is not started for one more
        ([inst("a", InstanceState.STOPPED), inst("b", InstanceState.STOPPED)], {"a": 2}, 2, ("b", True, False)),
        # only a stopping instance: place it there, the worker restarts it
        ([inst("a", InstanceState.STOPPING)], {}, 2, ("a", False, False)),
        # a stopping instance with room comes before going past the limit on a full running one
        ([inst("a", InstanceState.RUNNING), inst("b", InstanceState.STOPPING)], {"a": 2}, 2, ("b", False, False)),
        # every instance full: up first, then stopping, then stopped (started)
        ([inst("a", InstanceState.STOPPED), inst("b", InstanceState.STOPPING)], {"a": 2, "b": 2}, 2,
         ("b", False, True)),
        ([inst("a", InstanceState.STOPPED)], {"a": 2}, 2, ("a", True, True)),
        # terminated instances take nothing
        ([inst("a", InstanceState.TERMINATED)], {}, 2, None),
    ],
)
def test_place_job(instances, load, limit, expected):
    placement = place_job(instances, load, limit)
    assert (None if placement is None else (placement.instance_id, placement.start, placement.over_limit)) == expected


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
