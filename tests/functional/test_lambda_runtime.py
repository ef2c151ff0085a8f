"""The local Lambda runtime against a moto server: Invoke API, SQS polling, retries, timeouts, schedules."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from batchworker.local.lambda_pool import InvocationResult
from batchworker.local.lambda_runtime import LocalLambdaRuntime, zip_name_for
from batchworker.local.lambda_scheduler import parse_rate_seconds
from batchworker.local.sqs_poller import build_sqs_event, select_deletions

REGION = "us-east-1"
CLI_REGION = "eu-west-1"  # moto keeps regions apart: the CLI test's runtime sees only its own function
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
EVENTS = Path(__file__).parents[1] / "events"

ECHO_APP = """
import json, os, time

def handler(event, context):
    print("echo got", json.dumps(event))
    if "marker" in event:
        with open(event["marker"], "a") as f:
            f.write(json.dumps({"at": time.time(), "pid": os.getpid()}) + "\\n")
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {
        "event": event,
        "pid": os.getpid(),
        "function_name": context.function_name,
        "arn": context.invoked_function_arn,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "module_file": __file__,
        "env": {k: os.environ.get(k) for k in ("AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_TIMEOUT",
                                              "LAMBDA_TASK_ROOT", "GREETING", "AWS_REGION")},
    }
"""

# An SQS handler in house style: Powertools logger with the Lambda context, partial batch response.
BATCH_APP = """
import json, os, time
from aws_lambda_powertools import Logger

logger = Logger(service="batch-test")
MARKERS = os.environ["MARKER_FILE"]

@logger.inject_lambda_context
def handler(event, context):
    started = time.time()
    failures = []
    with open(MARKERS, "a") as f:
        for record in event["Records"]:
            f.write(json.dumps({"at": started, "body": record["body"],
                                "count": int(record["attributes"]["ApproximateReceiveCount"]),
                                "batch": len(event["Records"])}) + "\\n")
            if "bad" in record["body"]:
                failures.append({"itemIdentifier": record["messageId"]})
    logger.info("processed", extra={"records": len(event["Records"])})
    return {"batchItemFailures": failures}
"""

# Invokes echo with InvocationType=Event through plain boto3: only AWS_ENDPOINT_URL_LAMBDA routes it here.
FANOUT_APP = """
import json, boto3

lambda_client = boto3.client("lambda")

def handler(event, context):
    response = lambda_client.invoke(FunctionName="test-echo", InvocationType="Event",
                                    Payload=json.dumps(event).encode())
    return {"status": response["StatusCode"]}
"""


def make_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, textwrap.dedent(text))
    return buffer.getvalue()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


def deploy_function(
    clients: dict[str, Any], code_dir: Path, name: str, app: str, timeout: int = 3, env: dict | None = None
) -> str:
    role = clients["iam"].get_role(RoleName="lambda-test")["Role"]["Arn"]
    code = make_zip({"app.py": app})
    (code_dir / zip_name_for(name)).write_bytes(code)
    return clients["lambda"].create_function(
        FunctionName=name,
        Runtime="python3.11",
        Role=role,
        Handler="app.handler",
        Code={"ZipFile": code},
        Timeout=timeout,
        Environment={"Variables": env or {}},
    )["FunctionArn"]


def make_clients(moto_url: str, region: str) -> dict[str, Any]:
    services = ("iam", "lambda", "sqs", "events")
    clients = {s: boto3.client(s, endpoint_url=moto_url, region_name=region, **CREDENTIALS) for s in services}
    try:
        clients["iam"].create_role(RoleName="lambda-test", AssumeRolePolicyDocument="{}")
    except clients["iam"].exceptions.EntityAlreadyExistsException:
        pass
    return clients


@pytest.fixture(scope="module")
def cloud(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """GIVEN three functions, a queue with a DLQ and a disabled mapping, a schedule, and a running runtime."""
    tmp = tmp_path_factory.mktemp("lambda-runtime")
    code_dir, state_dir = tmp / "build", tmp / "state"
    code_dir.mkdir()
    clients = make_clients(moto_url, REGION)
    markers = tmp / "batch-markers.jsonl"
    deploy_function(clients, code_dir, "test-echo", ECHO_APP, timeout=2, env={"GREETING": "hi"})
    deploy_function(clients, code_dir, "test-batch", BATCH_APP, env={"MARKER_FILE": str(markers)})
    deploy_function(clients, code_dir, "test-fanout", FANOUT_APP)
    deploy_function(
        clients, code_dir, "test-tick", ECHO_APP
    )  # the schedule's own target keeps echo's pids stable
    clients["lambda"].create_function(  # deployed, but no zip in the code dir: not run locally
        FunctionName="test-nozip",
        Runtime="python3.11",
        Handler="app.handler",
        Code={"ZipFile": make_zip({})},
        Role=clients["iam"].get_role(RoleName="lambda-test")["Role"]["Arn"],
    )
    sqs = clients["sqs"]
    dlq_url = sqs.create_queue(QueueName="jobs-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    queue_url = sqs.create_queue(
        QueueName="jobs", Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive}
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    clients["lambda"].create_event_source_mapping(
        EventSourceArn=queue_arn,
        FunctionName="test-batch",
        Enabled=False,
        BatchSize=10,
        MaximumBatchingWindowInSeconds=0,
        FunctionResponseTypes=["ReportBatchItemFailures"],
    )
    schedule_markers = tmp / "schedule-markers.jsonl"
    clients["events"].put_rule(Name="tick", ScheduleExpression="rate(1 minute)")
    clients["events"].put_targets(
        Rule="tick",
        Targets=[
            {
                "Id": "tick",
                "Arn": "arn:aws:lambda:us-east-1:123456789012:function:test-tick",
                "Input": json.dumps({"marker": str(schedule_markers)}),
            }
        ],
    )
    runtime = LocalLambdaRuntime(
        code_dir,
        state_dir,
        endpoint_url=moto_url,
        schedule_speedup=120.0,
        async_retry_delays_seconds=(0.2, 0.4),
        session=boto3.session.Session(region_name=REGION, **CREDENTIALS),  # handlers get these credentials
    )
    runtime.start()
    lambda_client = boto3.client("lambda", endpoint_url=runtime.invoke_url, region_name=REGION, **CREDENTIALS)
    yield {
        "runtime": runtime,
        "clients": clients,
        "lambda": lambda_client,
        "tmp": tmp,
        "state_dir": state_dir,
        "queue_url": queue_url,
        "dlq_url": dlq_url,
        "markers": markers,
        "schedule_markers": schedule_markers,
    }
    pids = runtime.handler_pids()
    runtime.stop()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "handler processes left behind"


def invoke_json(lambda_client: Any, name: str, event: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    response = lambda_client.invoke(FunctionName=name, Payload=json.dumps(event).encode())
    return response, json.loads(response["Payload"].read())


def test_ready_file_lists_functions_that_have_a_zip(cloud: dict[str, Any]) -> None:
    ready = json.loads((cloud["state_dir"] / "lambda-runtime.json").read_text())

    assert ready["invoke_url"] == cloud["runtime"].invoke_url
    assert ready["pid"] == os.getpid()
    assert ready["functions"] == ["test-batch", "test-echo", "test-fanout", "test-tick"]
    assert [m["function"] for m in ready["event_source_mappings"]] == ["test-batch"]
    assert ready["schedules"] == [{"rule": "tick", "function": "test-tick", "period_seconds": 60}]


def test_request_response_returns_the_result_with_lambda_environment(cloud: dict[str, Any]) -> None:
    response, body = invoke_json(cloud["lambda"], "test-echo", {"hello": "world"})

    assert response["StatusCode"] == 200
    assert "FunctionError" not in response
    assert body["event"] == {"hello": "world"}
    assert body["function_name"] == "test-echo"
    assert body["arn"] == "arn:aws:lambda:us-east-1:123456789012:function:test-echo"
    assert 0 < body["remaining_ms"] <= 2000
    code_dir = cloud["state_dir"] / "code" / "test-echo"
    assert body["module_file"] == str(code_dir / "app.py")
    assert body["env"] == {
        "AWS_LAMBDA_FUNCTION_NAME": "test-echo",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "2",
        "LAMBDA_TASK_ROOT": str(code_dir),
        "GREETING": "hi",
        "AWS_REGION": REGION,
    }
    log = (cloud["state_dir"] / "logs" / "test-echo.log").read_text()
    assert 'echo got {"hello": "world"}' in log


def test_warm_process_is_reused_and_arn_names_work(cloud: dict[str, Any]) -> None:
    _, first = invoke_json(cloud["lambda"], "test-echo", {})
    _, second = invoke_json(cloud["lambda"], "arn:aws:lambda:us-east-1:123456789012:function:test-echo", {})

    assert first["pid"] == second["pid"]


def test_handler_error_is_reported_like_lambda(cloud: dict[str, Any]) -> None:
    response, body = invoke_json(cloud["lambda"], "test-echo", {"fail": True})

    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "asked to fail"


def test_unknown_function_bad_payload_and_dry_run(cloud: dict[str, Any]) -> None:
    lambda_client = cloud["lambda"]
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException):
        lambda_client.invoke(FunctionName="test-nozip", Payload=b"{}")
    with pytest.raises(lambda_client.exceptions.InvalidRequestContentException):
        lambda_client.invoke(FunctionName="test-echo", Payload=b"{not json")

    assert lambda_client.invoke(FunctionName="test-echo", InvocationType="DryRun")["StatusCode"] == 204


def test_concurrent_invocations_run_in_parallel_processes(cloud: dict[str, Any]) -> None:
    started = time.monotonic()

    with ThreadPoolExecutor(max_workers=3) as executor:
        results = list(
            executor.map(lambda _: invoke_json(cloud["lambda"], "test-echo", {"sleep": 0.6})[1], range(3))
        )

    assert time.monotonic() - started < 1.5
    assert len({r["pid"] for r in results}) == 3


def test_timeout_kills_the_process_and_the_next_invocation_gets_a_fresh_one(cloud: dict[str, Any]) -> None:
    _, before = invoke_json(cloud["lambda"], "test-echo", {})
    started = time.monotonic()

    response, body = invoke_json(cloud["lambda"], "test-echo", {"sleep": 30})

    assert 1.9 < time.monotonic() - started < 5
    assert response["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Sandbox.Timedout"
    assert not Path(f"/proc/{before['pid']}").exists()
    _, after = invoke_json(cloud["lambda"], "test-echo", {})
    assert after["pid"] != before["pid"]


def test_async_invoke_from_a_handler_reaches_the_runtime(cloud: dict[str, Any]) -> None:
    marker = cloud["tmp"] / "fanout-marker.jsonl"

    response, body = invoke_json(cloud["lambda"], "test-fanout", {"marker": str(marker)})

    assert response["StatusCode"] == 200, body
    assert body == {"status": 202}
    wait_for(lambda: read_lines(marker), 10, "the echo function invoked asynchronously by test-fanout")


def test_failed_async_invoke_is_retried_twice(cloud: dict[str, Any]) -> None:
    marker = cloud["tmp"] / "retry-marker.jsonl"

    response = cloud["lambda"].invoke(
        FunctionName="test-echo",
        InvocationType="Event",
        Payload=json.dumps({"marker": str(marker), "fail": True}),
    )

    assert response["StatusCode"] == 202
    wait_for(lambda: len(read_lines(marker)) == 3, 10, "three attempts")
    time.sleep(1.0)
    assert len(read_lines(marker)) == 3


def test_sqs_good_messages_are_deleted_bad_ones_retried_then_dead_lettered(cloud: dict[str, Any]) -> None:
    sqs, queue_url = cloud["clients"]["sqs"], cloud["queue_url"]
    sent_at = time.time()

    for body in ("good-1", "bad-1", "good-2"):
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)

    def bodies(count: int | None = None) -> list[str]:
        return [m["body"] for m in read_lines(cloud["markers"]) if count is None or m["count"] == count]

    wait_for(lambda: {"good-1", "good-2", "bad-1"} <= set(bodies()), 10, "the first deliveries")
    first = min(m["at"] for m in read_lines(cloud["markers"]))
    print(f"SendMessage -> handler start: {first - sent_at:.3f}s (includes the cold start)")
    dead = wait_for(
        lambda: sqs.receive_message(QueueUrl=cloud["dlq_url"], WaitTimeSeconds=1).get("Messages"),
        15,
        "the DLQ",
    )
    assert [m["Body"] for m in dead] == ["bad-1"]
    assert bodies(2) == ["bad-1"]  # redelivered once after the visibility timeout, then moved on receive 3
    assert sorted(bodies(1)) == ["bad-1", "good-1", "good-2"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_sqs_latency_with_a_warm_handler(cloud: dict[str, Any]) -> None:
    sqs = cloud["clients"]["sqs"]
    already = len(read_lines(cloud["markers"]))
    sent_at = time.time()

    sqs.send_message(QueueUrl=cloud["queue_url"], MessageBody="good-latency")

    wait_for(lambda: len(read_lines(cloud["markers"])) > already, 5, "delivery")
    latency = read_lines(cloud["markers"])[-1]["at"] - sent_at
    print(f"SendMessage -> handler start (warm): {latency:.3f}s")
    assert latency < 1.5


def test_schedule_fires_with_the_faster_clock(cloud: dict[str, Any]) -> None:
    # rate(1 minute) at speedup 120 fires every 0.5 s, with the target's constant Input as the event.
    wait_for(lambda: len(read_lines(cloud["schedule_markers"])) >= 2, 5, "two scheduled invocations")


def test_cli_serves_until_sigterm_and_leaves_no_process(moto_url: str, tmp_path: Path) -> None:
    clients = make_clients(moto_url, CLI_REGION)
    code_dir, state_dir = tmp_path / "build", tmp_path / "state"
    code_dir.mkdir()
    deploy_function(clients, code_dir, "cli-echo", ECHO_APP)
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_DEFAULT_REGION": CLI_REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchworker.local.lambda_runtime",
            "--code-dir",
            str(code_dir),
            "--state-dir",
            str(state_dir),
        ],
        env=env,
        cwd=Path(__file__).parents[2],
    )
    try:
        ready_file = state_dir / "lambda-runtime.json"
        wait_for(ready_file.exists, 15, "the ready file")
        ready = json.loads(ready_file.read_text())
        assert ready["pid"] == process.pid and ready["functions"] == ["cli-echo"]
        lambda_client = boto3.client(
            "lambda", endpoint_url=ready["invoke_url"], region_name=CLI_REGION, **CREDENTIALS
        )
        _, body = invoke_json(lambda_client, "cli-echo", {"x": 1})
        assert body["event"] == {"x": 1}

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=10) == 0
        assert not Path(f"/proc/{body['pid']}").exists()
        assert not ready_file.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- pure parts ---------------------------------------------------------------------------------------


def test_parse_rate_seconds() -> None:
    assert parse_rate_seconds("rate(5 minutes)") == 300
    assert parse_rate_seconds("rate(1 hour)") == 3600
    assert parse_rate_seconds("rate(10 seconds)") == 10
    assert parse_rate_seconds("cron(0 12 * * ? *)") is None


def test_sample_sqs_event_has_the_shape_the_poller_builds() -> None:
    sample = json.loads((EVENTS / "sqs_s3_object_created.json").read_text())
    message = {"MessageId": "m", "ReceiptHandle": "r", "Body": "{}", "MD5OfBody": "x", "Attributes": {}}

    built = build_sqs_event([message], "arn:aws:sqs:us-east-1:123456789012:jobs")["Records"][0]

    assert set(built) <= set(sample["Records"][0])
    assert built["eventSource"] == "aws:sqs" and built["awsRegion"] == "us-east-1"


@pytest.mark.parametrize(
    ("result", "deleted"),
    [
        (InvocationResult("r", error_type="ValueError", error_message="x"), []),
        (InvocationResult("r", payload="null"), ["a", "b"]),
        (InvocationResult("r", payload='{"batchItemFailures": []}'), ["a", "b"]),
        (InvocationResult("r", payload='{"batchItemFailures": [{"itemIdentifier": "a"}]}'), ["b"]),
        (InvocationResult("r", payload='{"batchItemFailures": [{"itemIdentifier": "zzz"}]}'), []),
        (InvocationResult("r", payload='{"batchItemFailures": [{"itemIdentifier": ""}]}'), []),
        (InvocationResult("r", payload='"not an object"'), []),
    ],
)
def test_select_deletions_follows_lambda_partial_batch_rules(
    result: InvocationResult, deleted: list[str]
) -> None:
    messages = [{"MessageId": "a"}, {"MessageId": "b"}]

    assert [m["MessageId"] for m in select_deletions(messages, result, True)] == deleted


def test_select_deletions_ignores_item_failures_without_report_batch_item_failures() -> None:
    result = InvocationResult("r", payload='{"batchItemFailures": [{"itemIdentifier": "a"}]}')

    assert len(select_deletions([{"MessageId": "a"}, {"MessageId": "b"}], result, False)) == 2
