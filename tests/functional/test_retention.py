"""Issue 14: final jobs and instance events expire (DynamoDB TTL `expires_at`); the ledger records stay.

Through the trigger and stop functions as deployed (`BATCHWORKER_JOB_RETENTION_DAYS`, Terraform's
job_retention_days): on the code before this issue no row ever carried `expires_at`, so both tables grew forever.
"""

from __future__ import annotations

import json
import time

import boto3

from batchworker.models import job_id_for
from tests.functional.handler_support import (
    LambdaContext,
    RecordingLambdaClient,
    load_handler,
    s3_event,
    sqs_event,
)


def test_final_jobs_and_instance_events_expire_and_the_ledger_does_not(stack, monkeypatch):
    monkeypatch.setenv("BATCHWORKER_JOB_RETENTION_DAYS", "2")
    trigger, stop = load_handler("trigger"), load_handler("stop")
    trigger.lambda_client = RecordingLambdaClient()
    # GIVEN an upload: the trigger records the job and starts the instance
    trigger.handler(sqs_event(s3_event(stack.input_bucket, "a.png", "v1")), LambdaContext())
    job_id = job_id_for(stack.input_bucket, "a.png", "v1")
    assert "expires_at" not in stack.job_item(job_id)  # active rows never expire
    # WHEN its manifest lands and the stop function records it (and stops the idle instance)
    key = f"jobs/{job_id}/manifest.json"
    boto3.client("s3").put_object(Bucket=stack.output_bucket, Key=key, Body=json.dumps(
        {"job_id": job_id, "status": "succeeded", "error": None, "input": {}, "outputs": [], "timings": {}}))
    stop.handler(sqs_event(s3_event(stack.output_bucket, key.replace("/", "%2F"))), LambdaContext())
    assert stack.instance_state() == "stopped"
    # THEN the final job and the start and stop events expire in 2 days; the instance's ledger never does
    expiry = time.time() + 2 * 86400
    final = stack.job_item(job_id)
    assert final["status"]["S"] == "SUCCEEDED"
    assert "expires_at" in final, f"the final job carries no expiry: {final}"
    assert abs(int(final["expires_at"]["N"]) - expiry) < 60
    items = boto3.client("dynamodb").scan(TableName=stack.events_table)["Items"]
    events = [item for item in items if "state" in item and item["at"]["S"] != "~ledger"]
    assert sorted(event["state"]["S"] for event in events) == ["start", "stop"]
    assert all(abs(int(event.get("expires_at", {"N": "0"})["N"]) - expiry) < 60 for event in events), events
    assert all("expires_at" not in item for item in items if item["at"]["S"] == "~ledger")
