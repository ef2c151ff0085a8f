"""Issue 14: final jobs and instance events expire (DynamoDB TTL `expires_at`); the ledger records stay."""

from __future__ import annotations

import time

import boto3

from batchworker.instances import InstanceHistory
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.models import ACTIVE_STATUSES, Job, JobStatus


def test_final_jobs_and_instance_events_carry_an_expiry_and_the_ledger_does_not(stack):
    jobs = JobStore(stack.jobs_table, retention_days=2)
    jobs.create_queued(Job("j-00000000000000aa", JobStatus.QUEUED, stack.input_bucket, "a.png"))
    assert "expires_at" not in stack.job_item("j-00000000000000aa")  # active rows never expire
    jobs.transition("j-00000000000000aa", JobStatus.SUCCEEDED, allowed_from=ACTIVE_STATUSES)
    expires = int(stack.job_item("j-00000000000000aa")["expires_at"]["N"])
    assert abs(expires - (time.time() + 2 * 86400)) < 60
    InstanceHistory(stack.events_table, retention_days=2).record(stack.instance_id, "start", "test")
    InstanceLedger(stack.events_table).note_assignment(stack.instance_id, job_ids=["j-00000000000000aa"])
    items = boto3.client("dynamodb").scan(TableName=stack.events_table)["Items"]
    [event] = [item for item in items if item["at"]["S"] != "~ledger"]
    [ledger] = [item for item in items if item["at"]["S"] == "~ledger"]
    assert abs(int(event["expires_at"]["N"]) - (time.time() + 2 * 86400)) < 60
    assert "expires_at" not in ledger
