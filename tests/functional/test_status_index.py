"""The jobs table's sharded status index: what it carries, who reads it, and the upgrade's backfill."""

from __future__ import annotations

import boto3

from batchworker.jobs import JobStore, status_shard
from batchworker.models import Job, JobStatus, utc_now
from tests.functional.conftest import PREFIX
from worker.lease import renew_lease
from worker.spec import Lease

TABLE = f"{PREFIX}-jobs"


def test_jobs_spread_over_the_shards_and_the_reaper_reads_them_with_their_leases(stack):
    jobs = JobStore(TABLE)
    ids = [f"j-{n:016x}" for n in range(12)]
    for job_id in ids:
        jobs.create_queued(Job(job_id, JobStatus.QUEUED, stack.input_bucket, f"{job_id}.png"))
    for job_id in ids[:6]:  # half of them launched, renewing their leases, one of them started
        jobs.transition(job_id, JobStatus.DISPATCHED, allowed_from=[JobStatus.QUEUED], lease_seconds=60)
        renew_lease(boto3.client("dynamodb"), job_id, Lease(TABLE, 60), utc_now(), progress=(1, 4))
    renew_lease(boto3.client("dynamodb"), ids[0], Lease(TABLE, 60), utc_now(), started=True)
    # THEN each status is found across its shards, every job once, in the index's view without the lease
    assert {job.job_id for job in jobs.by_status(JobStatus.QUEUED)} == set(ids[6:])
    assert {job.job_id for job in jobs.by_status(JobStatus.DISPATCHED)} == set(ids[1:6])
    assert [job.job_id for job in jobs.by_status(JobStatus.RUNNING)] == [ids[0]]
    assert len({status_shard(job_id, "QUEUED") for job_id in ids}) > 1
    in_index = jobs.active_in_index()
    assert sorted(job.job_id for job in in_index) == ids
    assert all(job.lease_expires_at is None and job.items_done is None for job in in_index)
    # AND the reaper's read has the leases and the progress, from the table itself
    full = {job.job_id: job for job in jobs.active()}
    assert set(full) == set(ids)
    assert all(full[job_id].lease_expires_at and full[job_id].items_done == 1 for job_id in ids[:6])
    assert full[ids[0]].status is JobStatus.RUNNING and full[ids[0]].running_since
    # AND a job that ended is in its final status's shard, not among the active ones
    jobs.transition(ids[0], JobStatus.SUCCEEDED, allowed_from=[JobStatus.RUNNING])
    assert ids[0] not in {job.job_id for job in jobs.active()}
    assert [job.job_id for job in jobs.by_status(JobStatus.SUCCEEDED)] == [ids[0]]


def test_the_backfill_puts_jobs_written_before_the_sharded_index_into_it(stack):
    ddb, jobs = boto3.client("dynamodb"), JobStore(f"{PREFIX}-jobs")
    # GIVEN a running job written before the index was sharded (no status_shard): the index does not show it
    ddb.put_item(TableName=f"{PREFIX}-jobs", Item={
        "job_id": {"S": "j-old"}, "status": {"S": "RUNNING"}, "input_bucket": {"S": "in"}, "input_key": {"S": "k"},
        "created_at": {"S": "2026-01-01T00:00:00.000Z"}, "instance_id": {"S": stack.instance_id},
    })
    assert [job.job_id for job in jobs.by_status(JobStatus.RUNNING)] == []
    # WHEN the backfill runs (twice: the second finds nothing to do)
    assert [jobs.backfill_status_shards(), jobs.backfill_status_shards()] == [1, 0]
    # THEN the job is in its status's shard, as a job written now would be
    assert [job.job_id for job in jobs.by_status(JobStatus.RUNNING)] == ["j-old"]
    assert stack.job_item("j-old")["status_shard"]["S"] == status_shard("j-old", "RUNNING")
