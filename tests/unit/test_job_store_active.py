"""JobStore.active: a job that changes status between the per-status queries is counted once."""

from __future__ import annotations

from batchworker.jobs import JobStore
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
        yield {"Items": self.by_status[query["ExpressionAttributeValues"][":s"]["S"]]}


def test_a_job_seen_in_two_statuses_counts_once_in_its_newer_state():
    active = JobStore("jobs", client=MovingTable()).active()
    assert sorted(job.job_id for job in active) == ["j-1", "j-2", "j-3"]
    assert next(job for job in active if job.job_id == "j-2").status is JobStatus.RUNNING
