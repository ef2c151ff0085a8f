"""The three Lambda handlers against in-process moto: the AWS state each one leaves behind."""

import json

import boto3

from batchworker.instances import InstanceHistory
from batchworker.models import job_id_for
from tests.functional.handler_support import (
    LambdaContext,
    RecordingLambdaClient,
    load_handler,
    s3_event,
    sqs_event,
)


def test_trigger_records_job_starts_instance_and_invokes_worker(stack):
    # GIVEN a stopped pool and an upload whose key has spaces and shell text (URL-encoded in the event)
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    key = "in box/$(rm -rf ~) ;x.png"
    encoded = "in+box%2F%24%28rm+-rf+%7E%29+%3Bx.png"
    event = sqs_event({"Service": "Amazon S3", "Event": "s3:TestEvent"}, s3_event(stack.input_bucket, encoded, "v1"))
    # WHEN the trigger handles the batch
    result = trigger.handler(event, LambdaContext())
    # THEN no record failed, one job is QUEUED with the decoded key, the instance starts, the worker is invoked
    assert result == {"batchItemFailures": []}
    job_id = job_id_for(stack.input_bucket, key, "v1")
    item = stack.job_item(job_id)
    assert item["status"]["S"] == "QUEUED"
    assert item["input_key"]["S"] == key
    assert item["instance_id"]["S"] == stack.instance_id
    assert stack.instance_state() == "running"
    assert len(recorder.calls) == 1
    assert recorder.calls[0]["InvocationType"] == "Event"
    assert json.loads(recorder.calls[0]["Payload"]) == {"job_ids": [job_id]}
    events = InstanceHistory(stack.events_table).events(stack.instance_id)
    assert [e["state"] for e in events] == ["start"]


def test_trigger_duplicate_delivery_makes_one_job(stack):
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    body = s3_event(stack.input_bucket, "a.png", "v1")
    trigger.handler(sqs_event(body), LambdaContext())
    job_id = job_id_for(stack.input_bucket, "a.png", "v1")
    boto3.client("dynamodb").update_item(
        TableName=stack.jobs_table, Key={"job_id": {"S": job_id}}, UpdateExpression="SET #s = :r",
        ExpressionAttributeNames={"#s": "status"}, ExpressionAttributeValues={":r": {"S": "RUNNING"}},
    )
    trigger.handler(sqs_event(body), LambdaContext())
    assert len(boto3.client("dynamodb").scan(TableName=stack.jobs_table)["Items"]) == 1
    assert len(recorder.calls) == 1  # the redelivery of a job under way invokes nothing


def test_trigger_rejects_other_buckets_and_fails_only_malformed_records(stack):
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    event = sqs_event(s3_event("someone-elses-bucket", "x.png"), s3_event(stack.input_bucket, "ok.csv"))
    event["Records"].append({**event["Records"][0], "messageId": "broken", "body": "{not json"})
    result = trigger.handler(event, LambdaContext())
    assert result == {"batchItemFailures": [{"itemIdentifier": "broken"}]}
    items = boto3.client("dynamodb").scan(TableName=stack.jobs_table)["Items"]
    assert [i["input_key"]["S"] for i in items] == ["ok.csv"]
    assert len(recorder.calls) == 1


def test_stop_records_final_status_and_stops_idle_instance(stack):
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    trigger.handler(sqs_event(s3_event(stack.input_bucket, "a.png", "v1")), LambdaContext())
    trigger.handler(sqs_event(s3_event(stack.input_bucket, "b.png", "v1")), LambdaContext())
    a, b = (job_id_for(stack.input_bucket, k, "v1") for k in ("a.png", "b.png"))
    s3 = boto3.client("s3")
    stop = load_handler("stop")

    def land_manifest(job_id, status, error=None):
        key = f"jobs/{job_id}/manifest.json"
        s3.put_object(Bucket=stack.output_bucket, Key=key, Body=json.dumps(
            {"job_id": job_id, "status": status, "error": error, "input": {}, "outputs": [], "timings": {}}))
        return stop.handler(sqs_event(s3_event(stack.output_bucket, key.replace("/", "%2F"))), LambdaContext())

    # WHEN job a finishes while b is still queued THEN the instance stays up
    assert land_manifest(a, "succeeded") == {"batchItemFailures": []}
    assert stack.job_item(a)["status"]["S"] == "SUCCEEDED"
    assert stack.instance_state() == "running"
    # WHEN b fails THEN its error is recorded and the instance stops
    land_manifest(b, "failed", "input.csv row 3 has 63 values")
    assert stack.job_item(b)["status"]["S"] == "FAILED"
    assert stack.job_item(b)["last_error"]["S"] == "input.csv row 3 has 63 values"
    assert stack.instance_state() == "stopped"


def test_stop_ignores_a_manifest_naming_another_job(stack):
    stop = load_handler("stop")
    s3 = boto3.client("s3")
    key = "jobs/j-00000000000000aa/manifest.json"
    s3.put_object(Bucket=stack.output_bucket, Key=key, Body=json.dumps({"job_id": "j-00000000000000bb", "status": "succeeded"}))
    assert stop.handler(sqs_event(s3_event(stack.output_bucket, key)), LambdaContext()) == {"batchItemFailures": []}
    assert stack.job_item("j-00000000000000bb") is None


def test_worker_that_cannot_reach_the_instance_writes_a_failed_manifest(stack):
    # GIVEN a queued job whose instance never publishes an SSH endpoint
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    trigger.handler(sqs_event(s3_event(stack.input_bucket, "a.png", "v1")), LambdaContext())
    job_id = job_id_for(stack.input_bucket, "a.png", "v1")
    boto3.client("ssm").put_parameter(Name="/bwtest/ssh/private-key", Type="SecureString", Value=_private_key())
    worker = load_handler("worker")
    worker.launcher.poll_seconds = 0.05
    # WHEN the worker runs (ready timeout 5 s in this stack)
    result = worker.handler({"job_ids": [job_id]}, LambdaContext())
    # THEN the job failed with a message naming the timeout and a failed manifest was written
    assert result["statuses"] == {job_id: "FAILED"}
    manifest = json.loads(boto3.client("s3").get_object(
        Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read())
    assert manifest["status"] == "failed"
    assert "not reachable over SSH" in manifest["error"]
    assert manifest["input"]["key"] == "a.png"
    assert stack.job_item(job_id)["status"]["S"] == "FAILED"


def _private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


def test_a_burst_in_one_batch_is_one_worker_invocation(stack):
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    keys = [f"burst/{n}.png" for n in range(3)]
    trigger.handler(sqs_event(*(s3_event(stack.input_bucket, k, "v1") for k in keys)), LambdaContext())
    assert len(recorder.calls) == 1
    assert json.loads(recorder.calls[0]["Payload"]) == {
        "job_ids": [job_id_for(stack.input_bucket, k, "v1") for k in keys]
    }
    starts = [e for e in InstanceHistory(stack.events_table).events(stack.instance_id) if e["state"] == "start"]
    assert len(starts) == 1


def test_an_input_over_the_size_limit_fails_before_any_instance_starts(stack, monkeypatch):
    monkeypatch.setenv("BATCHWORKER_MAX_INPUT_BYTES", "1000")
    trigger = load_handler("trigger")
    trigger.lambda_client = recorder = RecordingLambdaClient()
    trigger.handler(sqs_event(s3_event(stack.input_bucket, "huge.npy", "v1", size=5000)), LambdaContext())
    job_id = job_id_for(stack.input_bucket, "huge.npy", "v1")
    assert stack.job_item(job_id)["status"]["S"] == "FAILED"
    manifest = json.loads(boto3.client("s3").get_object(
        Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read())
    assert "over the 1000-byte limit" in manifest["error"]
    assert recorder.calls == [] and stack.instance_state() == "stopped"
