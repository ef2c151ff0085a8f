"""Race-free stop and the watchdog pass, against in-process moto."""

import json
from datetime import timedelta

import boto3
import pytest

from batchworker.config import Settings
from batchworker.control import Upload, accept_upload, finish_job, stop_if_idle
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import STATUS_SHARDS, JobStore
from batchworker.ledger import InstanceLedger
from batchworker.models import ACTIVE_STATUSES, Job, JobStatus, utc_now
from batchworker.reaper import reap
from worker.lease import renew_lease
from worker.spec import Lease


def parts(stack, **overrides):
    settings = Settings.from_env({**stack.env, "BATCHWORKER_TRANSPORT": "ssh", **overrides})
    jobs = JobStore(settings.jobs_table)
    pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table))
    ledger = InstanceLedger(settings.instance_events_table)
    return settings, jobs, pool, ledger


def queue(stack, settings, jobs, pool, ledger, key, invoked=None):
    calls = invoked if invoked is not None else []
    upload = Upload(stack.input_bucket, key, 1, "etag", "v1")
    return accept_upload(upload, settings, jobs, pool, ledger, lambda job_id, instance_id: calls.append(job_id),
                         boto3.client("s3"))


def succeed(jobs, ledger, job_id):
    """The job's "succeeded" manifest is recorded, as the stop function does."""
    finish_job({"job_id": job_id, "status": "succeeded"}, f"jobs/{job_id}/manifest.json", jobs, ledger)


def test_two_stops_racing_claim_one_stop(stack):
    settings, jobs, pool, ledger = parts(stack)
    job_id = queue(stack, settings, jobs, pool, ledger, "a.png")
    succeed(jobs, ledger, job_id)
    # GIVEN two stop functions that both read the ledger before either claims
    seen = [ledger.read(stack.instance_id), ledger.read(stack.instance_id)]
    # THEN exactly one claim wins
    assert [ledger.claim_stop(stack.instance_id, e.generation) for e in seen] == [True, False]


def test_an_upload_between_decision_and_claim_voids_the_stop(stack):
    settings, jobs, pool, ledger = parts(stack)
    first = queue(stack, settings, jobs, pool, ledger, "a.png")
    succeed(jobs, ledger, first)
    entry = ledger.read(stack.instance_id)  # the stop function has read the generation and found no job
    queue(stack, settings, jobs, pool, ledger, "b.png")  # WHEN an upload is placed on the instance meanwhile
    assert ledger.claim_stop(stack.instance_id, entry.generation) is False  # THEN the stop is void
    decision = stop_if_idle(stack.instance_id, "test", settings, jobs, pool, ledger)
    assert decision.stop is False and "placed on it" in decision.reason
    assert stack.instance_state() == "running"


def test_reaper_retries_a_job_whose_lease_expired_then_fails_it_with_a_manifest(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_MAX_ATTEMPTS="2")
    job_id = queue(stack, settings, jobs, pool, ledger, "lost.png")
    invoked = []
    for attempt in (1, 2):
        jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], count_attempt=True)
        jobs.transition(job_id, JobStatus.RUNNING, allowed_from=[JobStatus.DISPATCHED], lease_seconds=30)
        report = reap(settings, jobs, pool, ledger, boto3.client("s3"), invoked.append,
                      now=utc_now() + timedelta(seconds=60))
        if attempt == 1:  # an instance lost mid-job is transient: the job goes round again
            assert report.redispatched == [job_id] and jobs.get(job_id).status is JobStatus.QUEUED
    assert report.failed == [job_id]
    assert jobs.get(job_id).status is JobStatus.FAILED
    manifest = json.loads(boto3.client("s3").get_object(
        Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read())
    assert manifest["status"] == "failed" and "stopped reporting progress" in manifest["error"]


def launched(jobs, job_id, lease_seconds=1000):
    """The worker function's part: claimed, launched on the instance, holding a lease (its code not started)."""
    jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], count_attempt=True)
    jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.DISPATCHED], lease_seconds=lease_seconds)


def test_reaper_fails_a_job_past_its_maximum_runtime(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_MAX_JOB_RUNTIME_SECONDS="100")
    job_id = queue(stack, settings, jobs, pool, ledger, "long.png")
    launched(jobs, job_id)
    # the job's code starts (the instance's own write, worker/lease.py)
    assert renew_lease(jobs.client, job_id, Lease(settings.jobs_table, 1000), utc_now(), started=True)
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append, now=utc_now() + timedelta(seconds=150))
    assert report.failed == [job_id]
    assert "maximum runtime" in jobs.get(job_id).error


def test_waiting_for_a_slot_longer_than_the_cap_is_not_running(stack):
    # GIVEN a job launched on its instance, waiting there for a slot, its lease renewed, its code not started
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_MAX_JOB_RUNTIME_SECONDS="100")
    job_id = queue(stack, settings, jobs, pool, ledger, "waits.png")
    launched(jobs, job_id)
    lease = Lease(settings.jobs_table, 1000)
    assert renew_lease(jobs.client, job_id, lease, utc_now() + timedelta(seconds=140))
    # WHEN the reaper looks past the cap THEN it keeps the job: waiting is not running
    later = utc_now() + timedelta(seconds=150)
    assert reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append, now=later).failed == []
    job = jobs.get(job_id)
    assert job.status is JobStatus.DISPATCHED and job.running_since is None
    # AND once its code starts, the cap counts from then
    assert renew_lease(jobs.client, job_id, lease, later, started=True)
    assert jobs.get(job_id).status is JobStatus.RUNNING
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append, now=later + timedelta(seconds=90))
    assert report.failed == []
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append, now=later + timedelta(seconds=110))
    assert report.failed == [job_id]


def test_reaper_redispatches_stuck_jobs_then_gives_up(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_MAX_ATTEMPTS="2")
    job_id = queue(stack, settings, jobs, pool, ledger, "stuck.png")
    jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], count_attempt=True)
    later = utc_now() + timedelta(seconds=settings.stuck_after_seconds + 5)
    invoked = []
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), invoked.append, now=later)
    assert report.redispatched == [job_id] and invoked == [{"job_ids": [job_id]}]
    assert jobs.get(job_id).status is JobStatus.QUEUED
    jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], count_attempt=True)
    much_later = utc_now() + timedelta(seconds=2 * settings.stuck_after_seconds + 10)
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), invoked.append, now=much_later)
    assert report.failed == [job_id]
    assert "2 attempts" in jobs.get(job_id).error


def test_reaper_stops_an_idle_instance_only_after_the_grace_period(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_IDLE_GRACE_SECONDS="120")
    job_id = queue(stack, settings, jobs, pool, ledger, "a.png")
    succeed(jobs, ledger, job_id)
    ledger.note_activity(stack.instance_id)
    assert reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append).stopped == []
    assert stack.instance_state() == "running"
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append, now=utc_now() + timedelta(seconds=121))
    assert report.stopped == [stack.instance_id]
    assert stack.instance_state() == "stopped"


def test_reaper_stops_an_instance_started_by_hand(stack):
    settings, jobs, pool, ledger = parts(stack)
    job_id = queue(stack, settings, jobs, pool, ledger, "a.png")
    succeed(jobs, ledger, job_id)
    assert stop_if_idle(stack.instance_id, "test", settings, jobs, pool, ledger).stop
    boto3.client("ec2").start_instances(InstanceIds=[stack.instance_id])  # an operator starts it again
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append)
    assert report.stopped == [stack.instance_id]
    assert stack.instance_state() == "stopped"



def finish_one(stack, settings, jobs, pool, ledger, gaps, key, at):
    """An upload arrives at `at` (closing the pool's idle gap), its job ends at once, the stop function decides."""
    gaps.note_arrival(at)
    job_id = queue(stack, settings, jobs, pool, ledger, key)
    succeed(jobs, ledger, job_id)
    ledger.note_activity(stack.instance_id, at)
    return stop_if_idle(stack.instance_id, "jobs finished", settings, jobs, pool, ledger, at, gaps)


def test_adaptive_grace_stops_at_once_after_learning_that_jobs_are_isolated(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_IDLE_GRACE_SECONDS="120")
    gaps = IdleGaps(settings.instance_events_table)
    start = utc_now()
    # GIVEN no history yet: the whole 120 s grace keeps the instance up after its job
    assert finish_one(stack, settings, jobs, pool, ledger, gaps, "first.png", start).stop is False
    # WHEN the next upload comes 3 hours after the pool went idle (isolated jobs, as in the seed trace)
    decision = finish_one(stack, settings, jobs, pool, ledger, gaps, "later.png", start + timedelta(hours=3))
    # THEN that gap is learned and the instance is stopped as soon as the job ends: waiting never paid off
    assert gaps.recent() == pytest.approx([3 * 3600.0], abs=0.01)
    assert decision.stop is True and stack.instance_state() == "stopped"


def test_adaptive_grace_waits_as_long_as_work_took_to_come_back(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_IDLE_GRACE_SECONDS="120")
    fixed = Settings.from_env({**stack.env, "BATCHWORKER_TRANSPORT": "ssh", "BATCHWORKER_IDLE_GRACE_SECONDS": "120",
                               "BATCHWORKER_IDLE_GRACE_POLICY": "fixed"})
    gaps = IdleGaps(settings.instance_events_table)
    start = utc_now()
    # GIVEN uploads that each came 20 s after the pool went idle
    for n in range(4):
        assert not finish_one(stack, settings, jobs, pool, ledger, gaps, f"b{n}.png", start + timedelta(seconds=20 * n)).stop
    assert gaps.recent() == pytest.approx([20.0] * 3, abs=0.01)
    idle_since = start + timedelta(seconds=60)
    # THEN the idle instance waits 20 s (the fixed policy would wait 120 s), then stops
    assert not stop_if_idle(stack.instance_id, "t", settings, jobs, pool, ledger, idle_since + timedelta(seconds=15), gaps).stop
    assert not stop_if_idle(stack.instance_id, "t", fixed, jobs, pool, ledger, idle_since + timedelta(seconds=25), gaps).stop
    assert stop_if_idle(stack.instance_id, "t", settings, jobs, pool, ledger, idle_since + timedelta(seconds=25), gaps).stop
    assert stack.instance_state() == "stopped"


def test_a_finished_job_whose_manifest_event_is_late_is_never_dispatched_again(stack):
    # GIVEN a job that ran and wrote its manifest, whose done-queue delivery is held back past its lease
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_MAX_ATTEMPTS="3")
    job_id = queue(stack, settings, jobs, pool, ledger, "late.png")
    launched(jobs, job_id, lease_seconds=30)
    assert renew_lease(jobs.client, job_id, Lease(settings.jobs_table, 30), utc_now(), started=True)
    s3 = boto3.client("s3")
    manifest = {"job_id": job_id, "status": "succeeded", "input": {"bucket": stack.input_bucket, "key": "late.png"},
                "outputs": [f"jobs/{job_id}/predictions.csv"], "error": None, "timings": {}, "items": 1,
                "instance_id": stack.instance_id}
    s3.put_object(Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json", Body=json.dumps(manifest).encode())
    # WHEN the reaper finds the lease lapsed (the job stopped renewing it when it finished)
    invoked = []
    report = reap(settings, jobs, pool, ledger, s3, invoked.append, now=utc_now() + timedelta(seconds=60))
    # THEN it records the job's own end instead of running it again or failing it
    assert report.finished == [job_id] and report.redispatched == [] and report.failed == [] and invoked == []
    job = jobs.get(job_id)
    assert job.status is JobStatus.SUCCEEDED and job.manifest_key == f"jobs/{job_id}/manifest.json"
    written = json.loads(s3.get_object(Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read())
    assert written == manifest  # its manifest is not overwritten
    # AND a job whose lease lapsed without a manifest still goes round again
    other = queue(stack, settings, jobs, pool, ledger, "lost.png")
    launched(jobs, other, lease_seconds=30)
    report = reap(settings, jobs, pool, ledger, s3, invoked.append, now=utc_now() + timedelta(seconds=60))
    assert report.redispatched == [other] and report.finished == []


class ApiCalls:
    """Counts the AWS API calls made through the given clients (a botocore event hook), by operation."""

    def __init__(self, *clients):
        self.counts: dict[str, int] = {}
        for client in clients:
            client.meta.events.register("before-call", self._count)

    def _count(self, model, **_):
        self.counts[model.name] = self.counts.get(model.name, 0) + 1

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def grow_pool(stack, ec2, jobs, size):
    """Running pool instances up to `size`, each with a running job on it (so none of them is idle)."""
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    have = len([i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]])
    if size > have:
        ec2.run_instances(
            ImageId=ami, MinCount=size - have, MaxCount=size - have, InstanceType="g4dn.xlarge",
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "batchworker:pool", "Value": "bwtest"}]}],
        )
    ids = sorted(i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"])
    ec2.start_instances(InstanceIds=ids)
    for instance_id in ids:
        job = Job(f"j-{abs(hash(instance_id)) % 16**16:016x}", JobStatus.QUEUED, stack.input_bucket, instance_id,
                  instance_id=instance_id)
        if jobs.create_queued(job):
            launched(jobs, job.job_id)
            jobs.transition(job.job_id, JobStatus.RUNNING, allowed_from=[JobStatus.DISPATCHED])


def test_a_reaper_pass_makes_as_many_api_calls_for_50_instances_as_for_5(stack):
    ec2, ddb, s3 = boto3.client("ec2"), boto3.client("dynamodb"), boto3.client("s3")
    settings = Settings.from_env({**stack.env, "BATCHWORKER_IDLE_GRACE_SECONDS": "600"})
    jobs = JobStore(settings.jobs_table, client=ddb)
    pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table, client=ddb), client=ec2)
    ledger = InstanceLedger(settings.instance_events_table, client=ddb)
    gaps = IdleGaps(settings.instance_events_table, client=ddb)
    calls = ApiCalls(ec2, ddb, s3)
    per_pass = {}
    for size in (5, 50):
        # GIVEN a pool of `size` running instances, each busy with a job
        grow_pool(stack, ec2, jobs, size)
        calls.take()
        # WHEN the reaper makes a pass
        report = reap(settings, jobs, pool, ledger, s3, [].append, gaps=gaps)
        assert report.stopped == [] and report.failed == [] and report.redispatched == []
        per_pass[size] = calls.take()
    # THEN it read the pool once, the ledger in one batch, the active jobs once per status and shard of the index
    # and then in one batch (with their leases), at either size
    queries = len(ACTIVE_STATUSES) * STATUS_SHARDS
    assert per_pass[50] == per_pass[5] == {"DescribeInstances": 1, "BatchGetItem": 2, "Query": queries, "GetItem": 1}
