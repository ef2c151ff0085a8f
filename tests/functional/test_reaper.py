"""Race-free stop and the watchdog pass, against in-process moto."""

import json
from datetime import timedelta

import boto3
import pytest

from batchworker.config import Settings
from batchworker.control import Upload, accept_upload, finish_job, stop_if_idle
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.models import JobStatus, utc_now
from batchworker.reaper import reap


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


def test_reaper_fails_a_job_past_its_maximum_runtime(stack):
    settings, jobs, pool, ledger = parts(stack, BATCHWORKER_MAX_JOB_RUNTIME_SECONDS="100")
    job_id = queue(stack, settings, jobs, pool, ledger, "long.png")
    jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED])
    jobs.transition(job_id, JobStatus.RUNNING, allowed_from=[JobStatus.DISPATCHED], lease_seconds=1000)
    report = reap(settings, jobs, pool, ledger, boto3.client("s3"), [].append, now=utc_now() + timedelta(seconds=150))
    assert report.failed == [job_id]
    assert "maximum runtime" in jobs.get(job_id).error


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
