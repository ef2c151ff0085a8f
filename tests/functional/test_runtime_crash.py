"""Issue 4: the local Lambda runtime killed mid-batch: messages are redelivered and processed exactly once.

GIVEN  a queue (VisibilityTimeout 3 s, a DLQ after 5 receives) mapped (disabled mapping, batch size 10) to a
       function whose handler, for each SQS record, sleeps ~0.3 s, records the attempt (with the record's
       ApproximateReceiveCount), then "processes" the record idempotently: a conditional put of the body's id
       (attribute_not_exists, the pattern the real trigger uses for job rows) and, in the same transaction, an
       increment of a per-id counter of effective processing; a redelivered record fails the condition and
       is recognised as a duplicate. 30 messages are sent, and the runtime runs as a subprocess via its CLI.
WHEN   the runtime is killed with SIGKILL (its process group, and the handler processes, which run in
       sessions of their own) after the first records of the first batch were processed but before the
       batch finished, and a fresh runtime is started on the same state dir;
THEN   within 60 s every one of the 30 ids has been effectively processed exactly once (30 items, each
       counter == 1), the queue is empty (visible + in flight == 0), the DLQ is empty, and at least one
       message was received more than once (the redelivery really happened).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from tests.functional.test_lambda_runtime import (  # noqa: F401  (moto_url is a fixture)
    CREDENTIALS,
    deploy_function,
    make_clients,
    moto_url,
    wait_for,
)

REGION = "us-east-1"
MESSAGES = 30
REPO = Path(__file__).resolve().parents[2]

# A batch of 10 takes ~3-4 s; the attempt is recorded before the idempotent transaction, so a record that
# was killed during its sleep shows up as an attempt without an effective processing.
CRASH_APP = """
import json, os, time
import boto3
from botocore.exceptions import ClientError

ddb = boto3.client("dynamodb")
PROCESSED, COUNTERS = os.environ["PROCESSED_TABLE"], os.environ["COUNTERS_TABLE"]

def handler(event, context):
    for record in event["Records"]:
        item_id = json.loads(record["body"])["id"]
        receive_count = record["attributes"]["ApproximateReceiveCount"]
        time.sleep(0.3)
        ddb.update_item(
            TableName=COUNTERS, Key={"id": {"S": item_id}},
            UpdateExpression="ADD attempts :one, receive_counts :rc SET last_pid = :pid",
            ExpressionAttributeValues={":one": {"N": "1"}, ":rc": {"NS": [receive_count]},
                                       ":pid": {"N": str(os.getpid())}},
        )
        try:
            ddb.transact_write_items(TransactItems=[
                {"Put": {"TableName": PROCESSED,
                         "Item": {"id": {"S": item_id}, "pid": {"N": str(os.getpid())},
                                  "receive_count": {"N": receive_count}},
                         "ConditionExpression": "attribute_not_exists(id)"}},
                {"Update": {"TableName": COUNTERS, "Key": {"id": {"S": item_id}},
                            "UpdateExpression": "ADD effective :one",
                            "ExpressionAttributeValues": {":one": {"N": "1"}}}},
            ])
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            print("duplicate", item_id, "receive count", receive_count, flush=True)
    return {"batchItemFailures": []}
"""


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every process below `root` (handlers run in sessions of their own, so killpg does not reach them)."""
    parents = {int(p): _ppid(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # an orphan nobody reaps stays a zombie: dead all the same


def start_runtime(endpoint: str, code_dir: Path, state_dir: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchworker.local.lambda_runtime",
             "--code-dir", str(code_dir), "--state-dir", str(state_dir)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg takes the runtime and nothing else of ours
        )
    ready_file = state_dir / "lambda-runtime.json"
    wait_for(lambda: ready_file.exists() and json.loads(ready_file.read_text())["pid"] == process.pid,
             20, "the runtime's ready file")
    return process


def hard_kill(process: subprocess.Popen) -> list[int]:
    """SIGKILL the runtime's process group and every handler process it started; returns the handler pids."""
    handlers = descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in handlers:
        try:
            os.killpg(pid, signal.SIGKILL)  # each handler leads its own group (start_new_session)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)
    return handlers


def test_runtime_killed_mid_batch_redelivers_and_processes_each_message_once(
    moto_url: str, tmp_path: Path  # noqa: F811
) -> None:
    # GIVEN -----------------------------------------------------------------------------------------------
    clients = make_clients(moto_url, REGION)
    ddb = boto3.client("dynamodb", endpoint_url=moto_url, region_name=REGION, **CREDENTIALS,
                       config=Config(retries={"max_attempts": 2}))
    for table in ("crash-processed", "crash-counters"):
        ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                         AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                         KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
    code_dir, state_dir = tmp_path / "build", tmp_path / "state"
    code_dir.mkdir()
    deploy_function(clients, code_dir, "crash-batch", CRASH_APP, timeout=20,
                    env={"PROCESSED_TABLE": "crash-processed", "COUNTERS_TABLE": "crash-counters"})
    sqs = clients["sqs"]
    dlq_url = sqs.create_queue(QueueName="crash-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName="crash-jobs", Attributes={
        "VisibilityTimeout": "3",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5}),
    })["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    clients["lambda"].create_event_source_mapping(
        EventSourceArn=queue_arn, FunctionName="crash-batch", Enabled=False, BatchSize=10,
        MaximumBatchingWindowInSeconds=0, FunctionResponseTypes=["ReportBatchItemFailures"],
    )
    ids = [f"item-{n:02d}" for n in range(MESSAGES)]
    for start in range(0, MESSAGES, 10):
        sqs.send_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "MessageBody": json.dumps({"id": item_id})}
            for i, item_id in enumerate(ids[start:start + 10])])

    def processed_count() -> int:
        return ddb.scan(TableName="crash-processed", Select="COUNT", ConsistentRead=True)["Count"]

    def in_queue(url: str) -> int:
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"])

    log = tmp_path / "runtime.log"
    first = start_runtime(moto_url, code_dir, state_dir, log)
    second = None
    try:
        # WHEN: the first records of the first batch are done, the batch is not -------------------------
        wait_for(lambda: processed_count() >= 2, 30, "the first records to be processed")
        handlers = hard_kill(first)
        killed_at = time.monotonic()
        assert handlers, "the runtime had no handler process to kill"
        wait_for(lambda: not any(is_running(pid) for pid in handlers), 5, "the handler processes to die")
        time.sleep(0.5)  # let a request already sent by the dead handler land before counting
        done_before_restart = processed_count()
        assert 2 <= done_before_restart < 10, f"the kill was not mid-batch: {done_before_restart} processed"

        second = start_runtime(moto_url, code_dir, state_dir, log)

        # THEN: within 60 s all 30 processed exactly once, nothing left in the queue or the DLQ ----------
        wait_for(lambda: processed_count() == MESSAGES and in_queue(queue_url) == 0, 60,
                 f"all {MESSAGES} messages processed and deleted (log: {log})")
        recovered_in = time.monotonic() - killed_at

        processed = {i["id"]["S"] for i in ddb.scan(TableName="crash-processed", ConsistentRead=True)["Items"]}
        counters = {i["id"]["S"]: i for i in ddb.scan(TableName="crash-counters", ConsistentRead=True)["Items"]}
        assert processed == set(ids)
        assert {k: int(v["effective"]["N"]) for k, v in counters.items()} == dict.fromkeys(ids, 1)
        assert in_queue(dlq_url) == 0, "a message reached the DLQ"
        redelivered = {k: sorted(int(n) for n in v["receive_counts"]["NS"])
                       for k, v in counters.items() if int(v["attempts"]["N"]) > 1}
        assert redelivered, "no message was received twice: the crash did not force a redelivery"
        assert any(max(counts) > 1 for counts in redelivered.values())
        print(f"{done_before_restart} processed before the kill; redelivered: {redelivered}; "
              f"all done {recovered_in:.1f}s after the kill")
    finally:
        for process in (second, first):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    hard_kill(process)
