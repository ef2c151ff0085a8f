"""Issue 15, no storms: one dispatcher at a time per instance, claimed in its ledger item (moto over HTTP).

Promises: concurrent dispatchers of one instance launch every job exactly once and never two launches at a
time there (the others hand their jobs over and return); jobs placed while the holder is about to let go are
launched by it; a crashed dispatcher's claim lapses; with state-change events, no dispatcher waits through a
boot: the instance's `running` event dispatches what waits there, and the reaper is the fallback for a lost event.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import boto3
import pytest

from batchworker.config import Settings
from batchworker.control import Upload, accept_upload, dispatch_instance, dispatch_jobs
from batchworker.errors import PermanentError
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.models import JobStatus, utc_now
from batchworker.reaper import LOST_EVENT_SECONDS, reap
from tests.functional.handler_support import LambdaContext, load_handler

THREADS = 6
JOBS = 12


class SlowLauncher:
    """Records every launch; a launch takes a while, so dispatchers overlap if nothing stops them."""

    max_spec_bytes = 1 << 20

    def __init__(self, seconds: float = 0.2, during_launch=None):
        self.seconds = seconds
        self.during_launch = during_launch
        self.lock = threading.Lock()
        self.launched: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    def launch(self, instance_id, spec, deadline):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.during_launch is not None:
                hook, self.during_launch = self.during_launch, None
                hook()
            time.sleep(self.seconds)
            with self.lock:
                self.launched.extend(job["job_id"] for job in spec["jobs"])
        finally:
            with self.lock:
                self.in_flight -= 1
        return {"jobs": [{"job_id": job["job_id"], "pid": 1} for job in spec["jobs"]]}


def setup(stack, **env):
    settings = Settings.from_env({**stack.env, **env})
    jobs = JobStore(settings.jobs_table)
    pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table))
    return settings, jobs, pool, InstanceLedger(settings.instance_events_table)


def place(stack, settings, jobs, pool, ledger, count, prefix="in"):
    """Jobs accepted by the trigger's code (ledger, job row), their dispatch left to the test."""
    return [
        accept_upload(Upload(stack.input_bucket, f"{prefix}/{n}.png", 1, f"e{prefix}{n}", f"v{n}"), settings, jobs,
                      pool, ledger, lambda job_id, instance_id: None, boto3.client("s3"))
        for n in range(count)
    ]


def test_concurrent_dispatchers_of_one_instance_launch_every_job_once_one_at_a_time(http_stack):
    settings, jobs, pool, ledger = setup(http_stack)
    boto3.client("ec2").start_instances(InstanceIds=[http_stack.instance_id])
    job_ids = place(http_stack, settings, jobs, pool, ledger, JOBS)
    launcher = SlowLauncher(seconds=0.5)
    results: list[dict] = []
    errors: list[BaseException] = []
    # Each its own clients, as separate Lambda invocations (made here: creating clients is not thread-safe).
    clients = [(*setup(http_stack)[1:], boto3.client("s3")) for _ in range(THREADS)]

    def dispatcher(n):
        own_jobs, own_pool, own_ledger, own_s3 = clients[n]
        mine = job_ids[n::2] if n % 2 else job_ids  # overlapping sets, as retried and duplicated invocations
        try:
            results.append(dispatch_jobs(mine, settings, own_jobs, own_pool, launcher, own_s3, ledger=own_ledger))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=dispatcher, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(launcher.launched) == sorted(job_ids)  # every job once
    assert launcher.most_in_flight == 1  # one dispatcher at a time launched on the instance
    handed_over = [r for r in results if r and all(status is JobStatus.QUEUED for status in r.values())]
    assert handed_over, "no dispatcher found the instance claimed: the test did not make them overlap"
    for job_id in job_ids:
        job = jobs.get(job_id)
        assert job.status is JobStatus.DISPATCHED and job.lease_expires_at and job.attempts == 1
    entry = ledger.read(http_stack.instance_id)
    assert entry.dispatcher is None  # let go at the end


def test_jobs_handed_over_while_the_holder_is_about_to_let_go_are_launched_by_it(http_stack):
    settings, jobs, pool, ledger = setup(http_stack)
    boto3.client("ec2").start_instances(InstanceIds=[http_stack.instance_id])
    first = place(http_stack, settings, jobs, pool, ledger, 2)
    late: list[str] = []
    handed: list[dict] = []

    def new_jobs_arrive():
        # While the holder launches its last batch: the trigger places more jobs, and their dispatcher finds
        # the instance claimed. It must return at once, and the holder must launch them before it lets go.
        _, own_jobs, own_pool, own_ledger = setup(http_stack)
        late.extend(place(http_stack, settings, own_jobs, own_pool, own_ledger, 3, prefix="late"))
        handed.append(dispatch_jobs(late, settings, own_jobs, own_pool, launcher, boto3.client("s3"),
                                    ledger=own_ledger))

    launcher = SlowLauncher(seconds=0.05, during_launch=new_jobs_arrive)
    outcome = dispatch_jobs(first, settings, jobs, pool, launcher, boto3.client("s3"), ledger=ledger)
    assert handed == [{job_id: JobStatus.QUEUED for job_id in late}]  # handed over, not launched by it
    assert sorted(launcher.launched) == sorted(first + late)  # each once, all by the holder
    assert set(outcome) == set(first + late) and set(outcome.values()) == {JobStatus.DISPATCHED}
    assert ledger.read(http_stack.instance_id).dispatcher is None


def test_a_crashed_dispatchers_claim_lapses(http_stack):
    settings, jobs, pool, ledger = setup(http_stack)
    now = time.time()
    assert ledger.claim_dispatch(http_stack.instance_id, "crashed", 60, now=now) is not None
    assert ledger.claim_dispatch(http_stack.instance_id, "next", 60, now=now + 30) is None  # handed over
    entry = ledger.claim_dispatch(http_stack.instance_id, "next", 60, now=now + 61)  # lapsed: claimed
    assert entry is not None and entry.dispatcher == "next"
    assert ledger.release_dispatch(http_stack.instance_id, "next", entry.generation) is None


def test_with_state_events_no_dispatcher_waits_for_a_boot_the_running_event_dispatches(http_stack):
    settings, jobs, pool, ledger = setup(http_stack, BATCHWORKER_INSTANCE_STATE_EVENTS="true")
    ec2 = boto3.client("ec2")
    job_ids = place(http_stack, settings, jobs, pool, ledger, 3)
    ec2.stop_instances(InstanceIds=[http_stack.instance_id])  # stopped again under the placed jobs
    launcher = SlowLauncher(seconds=0)
    started = time.monotonic()
    outcome = dispatch_jobs(job_ids, settings, jobs, pool, launcher, boto3.client("s3"), ledger=ledger)
    assert time.monotonic() - started < 30  # no wait through the boot
    assert outcome == {job_id: JobStatus.QUEUED for job_id in job_ids} and not launcher.launched
    assert http_stack.instance_state() == "running"  # it started the stopped instance, then returned
    assert ledger.read(http_stack.instance_id).dispatcher is None

    # The running event (the worker's handler, given {"detail": {"instance-id": ..., "state": "running"}}):
    outcome = dispatch_instance(http_stack.instance_id, settings, jobs, pool, launcher, boto3.client("s3"), ledger)
    assert sorted(launcher.launched) == sorted(job_ids)
    assert set(outcome.values()) == {JobStatus.DISPATCHED}


def test_the_reaper_invokes_a_dispatcher_for_jobs_whose_running_event_was_lost(http_stack):
    # stuck_after_seconds (ready timeout + 120 s) beyond the lost-event delay: this is the nudge, not a retry
    settings, jobs, pool, ledger = setup(http_stack, BATCHWORKER_INSTANCE_STATE_EVENTS="true",
                                         BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS="60")
    boto3.client("ec2").start_instances(InstanceIds=[http_stack.instance_id])
    job_ids = place(http_stack, settings, jobs, pool, ledger, 2)
    invoked: list[dict] = []
    soon = reap(settings, jobs, pool, ledger, boto3.client("s3"), invoked.append)
    assert soon.nudged == [] and invoked == []  # a fresh placement: its dispatcher or event is on the way
    later = utc_now() + timedelta(seconds=LOST_EVENT_SECONDS + 5)
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), invoked.append, now=later)
    assert sorted(report.nudged) == sorted(job_ids)
    assert invoked == [{"job_ids": report.nudged}]
    assert all(jobs.get(j).status is JobStatus.QUEUED and not jobs.get(j).retries for j in job_ids)  # no retry counted


def test_the_worker_ignores_a_state_change_of_an_instance_with_nothing_placed_and_refuses_a_malformed_one(stack):
    worker = load_handler("worker")
    event = {"source": "aws.ec2", "detail-type": "EC2 Instance State-change Notification",
             "detail": {"instance-id": stack.instance_id, "state": "running"}}
    assert worker.handler(event, LambdaContext()) == {"statuses": {}}
    with pytest.raises(PermanentError):
        worker.handler({**event, "detail": {"instance-id": "i-; rm -rf /", "state": "running"}}, LambdaContext())
