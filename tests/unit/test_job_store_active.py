"""JobStore.active_in_index: a job that changes status between the per-status queries is counted once."""

from __future__ import annotations

from batchworker.jobs import JobStore, status_shard
from batchworker.models import JobStatus


def row(job_id: str, status: str, instance_id: str) -> dict:
    return {"job_id": {"S": job_id}, "status": {"S": status}, "input_bucket": {"S": "in"},
            "input_key": {"S": f"{job_id}.png"}, "instance_id": {"S": instance_id}}


class MovingTable:
    """The status-index as queried one status after the other, while j-2 moves from DISPATCHED to RUNNING."""

    def __init__(self):
        self.by_status = {
            "QUEUED": [row("j-1", "QUEUED", "i-a")],
            "DISPATCHED": [row("j-2", "DISPATCHED", "i-b")],
            "RUNNING": [row("j-2", "RUNNING", "i-b"), row("j-3", "RUNNING", "i-c")],
        }

    def get_paginator(self, name: str):
        assert name == "query"
        return self

    def paginate(self, **query):
        shard = query["ExpressionAttributeValues"][":s"]["S"]  # "<status>#<n>": the jobs of that shard
        status = shard.split("#")[0]
        yield {"Items": [item for item in self.by_status[status] if status_shard(item["job_id"]["S"], status) == shard]}


def test_a_job_seen_in_two_statuses_counts_once_in_its_newer_state():
    active = JobStore("jobs", client=MovingTable()).active_in_index()
    assert sorted(job.job_id for job in active) == ["j-1", "j-2", "j-3"]
    assert next(job for job in active if job.job_id == "j-2").status is JobStatus.RUNNING


def test_every_job_has_one_shard_per_status_and_the_instance_computes_the_same():
    from batchworker.jobs import STATUS_SHARDS, status_shards
    from worker.lease import status_shard as instance_status_shard

    ids = [f"j-{n:016x}" for n in range(200)]
    for status in ("QUEUED", "RUNNING"):
        assert {status_shard(job_id, status) for job_id in ids} == set(status_shards(status))  # all used
        assert all(status_shard(job_id, status) == instance_status_shard(job_id, status) for job_id in ids)
    assert len(status_shards(JobStatus.RUNNING)) == STATUS_SHARDS
