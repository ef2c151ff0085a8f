"""Faults moto never produces, injected through a wrapper around the EC2 client; each test states the end state."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from batchworker.config import Settings
from batchworker.control import Upload, accept_upload, dispatch_jobs
from batchworker.errors import DispatchError, InstanceReadyTimeout, LaunchInterrupted
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.models import JobStatus


class FaultyEc2:
    """Forwards to moto's EC2 client, but start_instances raises `code` for the first `times` calls."""

    def __init__(self, client, code: str, times: int):
        self.client, self.code, self.remaining, self.starts = client, code, times, 0

    def start_instances(self, **kwargs):
        self.starts += 1
        if self.remaining > 0:
            self.remaining -= 1
            raise ClientError({"Error": {"Code": self.code, "Message": "injected"}}, "StartInstances")
        return self.client.start_instances(**kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


class RecordingLauncher:
    max_spec_bytes = 1 << 20

    def __init__(self, fail_with: Exception | None = None, fail_times: int = 10**6):
        self.launched: list[tuple[str, dict]] = []
        self.fail_with = fail_with
        self.fail_times = fail_times

    def launch(self, instance_id, spec, deadline):
        if self.fail_with and self.fail_times > 0:
            self.fail_times -= 1
            raise self.fail_with
        self.launched.append((instance_id, spec))
        return {"jobs": [{"job_id": s["job_id"], "pid": 1} for s in spec["jobs"]]}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def setup(stack, ec2, clock, **env):
    settings = Settings.from_env({**stack.env, "BATCHWORKER_TRANSPORT": "ssh", **env})
    jobs = JobStore(settings.jobs_table)
    pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table), client=ec2,
                        sleep=clock.sleep, clock=clock, jitter=lambda s: s)
    return settings, jobs, pool, InstanceLedger(settings.instance_events_table)


def queue_job(stack, settings, jobs, pool, ledger, key="a.png"):
    placed = []
    job_id = accept_upload(Upload(stack.input_bucket, key, 1, "e", "v1"), settings, jobs, pool, ledger,
                           lambda job_id, instance_id: placed.append(instance_id), boto3.client("s3"))
    return job_id, placed


def test_insufficient_capacity_is_retried_with_backoff_until_the_instance_starts(stack):
    # GIVEN AWS has no GPU capacity for the first 3 starts
    clock = FakeClock()
    ec2 = FaultyEc2(boto3.client("ec2"), "InsufficientInstanceCapacity", times=3)
    settings, jobs, pool, ledger = setup(stack, ec2, clock, BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS="300")
    job_id, placed = queue_job(stack, settings, jobs, pool, ledger)
    # THEN the trigger did not fail: the job is queued on the (still stopped) instance
    assert placed == [stack.instance_id] and stack.instance_state() == "stopped"
    # WHEN the worker dispatches
    launcher = RecordingLauncher()
    outcome = dispatch_jobs([job_id], settings, jobs, pool, launcher, boto3.client("s3"), ledger, clock=clock)
    # THEN it retried (backing off) until the start went through, and the job runs
    assert outcome == {job_id: JobStatus.DISPATCHED}  # launched; RUNNING once its code starts
    assert ec2.starts == 4 and stack.instance_state() == "running"  # 1 by the trigger, 3 by the worker
    assert clock.now >= 2 + 4  # doubling waits, not a hot loop


def test_incorrect_instance_state_while_stopping_is_waited_out(stack):
    # GIVEN an upload placed on an instance whose stop is still in progress (EC2 refuses the start twice)
    clock = FakeClock()
    ec2 = FaultyEc2(boto3.client("ec2"), "IncorrectInstanceState", times=2)
    settings, jobs, pool, ledger = setup(stack, ec2, clock, BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS="300")
    job_id, _ = queue_job(stack, settings, jobs, pool, ledger)
    outcome = dispatch_jobs([job_id], settings, jobs, pool, RecordingLauncher(), boto3.client("s3"), ledger, clock=clock)
    # THEN the worker starts it again once EC2 accepts, and the upload is not stranded
    assert outcome == {job_id: JobStatus.DISPATCHED}  # launched; RUNNING once its code starts
    assert stack.instance_state() == "running"


def test_other_start_errors_are_not_retried(stack):
    clock = FakeClock()
    ec2 = FaultyEc2(boto3.client("ec2"), "UnauthorizedOperation", times=1)
    settings, jobs, pool, ledger = setup(stack, ec2, clock)
    with pytest.raises(ClientError):
        queue_job(stack, settings, jobs, pool, ledger)
    assert ec2.starts == 1


def test_a_host_key_mismatch_fails_the_burst_and_runs_nothing(stack):
    clock = FakeClock()
    settings, jobs, pool, ledger = setup(stack, boto3.client("ec2"), clock)
    ids = [queue_job(stack, settings, jobs, pool, ledger, f"{n}.png")[0] for n in range(3)]
    launcher = RecordingLauncher(fail_with=DispatchError("instance presented a host key other than the one it published"))
    outcome = dispatch_jobs(ids, settings, jobs, pool, launcher, boto3.client("s3"), ledger, clock=clock)
    assert set(outcome.values()) == {JobStatus.FAILED} and launcher.launched == []
    for job_id in ids:
        assert "host key" in jobs.get(job_id).error
    assert ledger.read(stack.instance_id).dispatcher is None  # the failed dispatcher let go of the instance


def test_duplicate_worker_invocations_launch_each_job_once(stack):
    clock = FakeClock()
    settings, jobs, pool, ledger = setup(stack, boto3.client("ec2"), clock)
    job_id, _ = queue_job(stack, settings, jobs, pool, ledger)
    launcher = RecordingLauncher()
    for _ in range(3):  # Lambda retries async invokes; events arrive twice
        dispatch_jobs([job_id, job_id], settings, jobs, pool, launcher, boto3.client("s3"), ledger, clock=clock)
    assert len(launcher.launched) == 1
    assert [s["job_id"] for s in launcher.launched[0][1]["jobs"]] == [job_id]
    assert jobs.get(job_id).attempts == 1
    assert ledger.read(stack.instance_id).dispatcher is None  # each invocation let go of its claim


def test_ready_timeout_names_the_state(stack):
    clock = FakeClock()
    settings, jobs, pool, ledger = setup(stack, boto3.client("ec2"), clock)
    with pytest.raises(InstanceReadyTimeout, match="did not reach running"):
        # an instance that never leaves pending: moto has none, so ask for one that is already past the deadline
        pool.ensure_running(stack.instance_id, deadline=-1, reason="test")


def test_a_launch_cut_off_by_an_instance_stop_is_relaunched_after_a_restart(stack):
    # GIVEN a launch that the instance's stop cuts off once (SSH exit status -1)
    clock = FakeClock()
    settings, jobs, pool, ledger = setup(stack, boto3.client("ec2"), clock, BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS="300")
    job_id, _ = queue_job(stack, settings, jobs, pool, ledger)
    launcher = RecordingLauncher(fail_with=LaunchInterrupted("cut off"), fail_times=1)
    original = launcher.launch

    def launch_and_stop_once(instance_id, spec, deadline):
        if launcher.fail_times:
            boto3.client("ec2").stop_instances(InstanceIds=[instance_id])
        return original(instance_id, spec, deadline)

    launcher.launch = launch_and_stop_once
    outcome = dispatch_jobs([job_id], settings, jobs, pool, launcher, boto3.client("s3"), ledger, clock=clock)
    # THEN the worker starts the instance again and relaunches: the job runs, it was not failed
    assert outcome == {job_id: JobStatus.DISPATCHED}  # launched; RUNNING once its code starts
    assert len(launcher.launched) == 1 and stack.instance_state() == "running"
