"""The SSM Run Command transport against in-process moto: the document, its parameters, the instance targeted.

moto records send_command but runs nothing (every invocation reports Success) and does not implement
DescribeInstanceInformation, so `SsmDouble` answers that call and injects faults; everything else
reaches moto. moto 5.2 also adds every EC2 instance to a command sent without Targets, so the instances
targeted are asserted on the request `SsmDouble` saw, the rest on what moto recorded.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from batchworker.config import Settings
from batchworker.errors import ConfigurationError, DispatchError, InstanceReadyTimeout
from batchworker.models import job_id_for
from batchworker.transports import make_launcher
from batchworker.transports.ssm import JOB_SPEC_PATTERN, SsmLauncher, execution_timeout
from tests.functional.handler_support import (
    LambdaContext,
    RecordingLambdaClient,
    load_handler,
    s3_event,
    sqs_event,
)

REPO = Path(__file__).resolve().parents[2]
PREFIX = "bwtest"
DOCUMENT = f"{PREFIX}-run-job"
HOSTILE_KEY = "in box/$(rm -rf ~) ;`id` \"dq\" 'sq' \\ \nline2 ü 雪 🚀 %2F +.png"

# The shape of terraform/ssm.tf's document (its allowedPatterns are checked equal below): a Command
# document, schema 2.2, typed parameters with allowedPatterns, the fixed launcher fed the decoded spec
# on stdin.
DOCUMENT_CONTENT = {
    "schemaVersion": "2.2",
    "description": "Start one batchworker job on this instance",
    "parameters": {
        "JobSpec": {
            "type": "String",
            "description": "base64 of the job spec JSON",
            "allowedPattern": JOB_SPEC_PATTERN,
        },
        "executionTimeout": {
            "type": "String",
            "default": "3600",
            "description": "seconds the launch may run",
            "allowedPattern": "^([1-9][0-9]{0,4}|1[0-6][0-9]{4}|17[01][0-9]{3}|172[0-7][0-9]{2}|172800)$",
        },
    },
    "mainSteps": [
        {
            "action": "aws:runShellScript",
            "name": "launchJob",
            "inputs": {
                "timeoutSeconds": "{{ executionTimeout }}",
                "runCommand": [
                    "set -eu",
                    "printf '%s' '{{ JobSpec }}' | base64 --decode"
                    " | /opt/batchworker/venv/bin/batchworker-job launch",
                ],
            },
        }
    ],
}


def client_error(code: str, operation: str, status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


class SsmDouble:
    """Answers describe_instance_information (Offline `offline_polls` times, then Online) and injects faults.

    `fail_first` maps an operation name to a list of exceptions raised by its first calls, in order;
    `invocations` replaces get_command_invocation's answers, one per call, the last one repeating.
    """

    def __init__(self, client, offline_polls=0, never_online=False, fail_first=None, invocations=None):
        self.client = client
        self.offline_polls = offline_polls
        self.never_online = never_online
        self.fail_first = {name: list(errors) for name, errors in (fail_first or {}).items()}
        self.invocations = list(invocations or [])
        self.calls: dict[str, int] = {}
        self.cancelled: list[dict] = []
        self.sent: list[dict] = []

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        pending = self.fail_first.get(name)
        if pending:
            raise pending.pop(0)

    def describe_instance_information(self, Filters):
        self._count("describe_instance_information")
        (instance_id,) = next(f["Values"] for f in Filters if f["Key"] == "InstanceIds")
        polls = self.calls["describe_instance_information"]
        if self.never_online or polls <= self.offline_polls:
            info = [] if polls == 1 else [{"InstanceId": instance_id, "PingStatus": "ConnectionLost"}]
        else:
            info = [{"InstanceId": instance_id, "PingStatus": "Online", "PlatformType": "Linux"}]
        return {"InstanceInformationList": info}

    def send_command(self, **kwargs):
        self._count("send_command")
        self.sent.append(kwargs)
        return self.client.send_command(**kwargs)

    def get_command_invocation(self, **kwargs):
        self._count("get_command_invocation")
        real = self.client.get_command_invocation(**kwargs)
        if not self.invocations:
            return real
        override = self.invocations.pop(0) if len(self.invocations) > 1 else self.invocations[0]
        return {**real, **override}

    def cancel_command(self, **kwargs):  # moto does not implement it
        self.cancelled.append(kwargs)
        return {}

    def __getattr__(self, name):
        return getattr(self.client, name)


class FakeTime:
    """A clock that sleep() advances, so bounded waits take no real time."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def settings_for(**overrides) -> Settings:
    env = {
        "BATCHWORKER_INPUT_BUCKET": f"{PREFIX}-input",
        "BATCHWORKER_OUTPUT_BUCKET": f"{PREFIX}-output",
        "BATCHWORKER_ARTIFACTS_BUCKET": f"{PREFIX}-artifacts",
        "BATCHWORKER_JOBS_TABLE": f"{PREFIX}-jobs",
        "BATCHWORKER_INSTANCE_EVENTS_TABLE": f"{PREFIX}-instance-events",
        "BATCHWORKER_POOL_TAG": PREFIX,
        "BATCHWORKER_WORKER_FUNCTION": f"{PREFIX}-worker",
        "BATCHWORKER_PARAMETER_PREFIX": f"/{PREFIX}",
        "BATCHWORKER_JOB_COMMAND": "/opt/batchworker/venv/bin/batchworker-job launch",
        "BATCHWORKER_TRANSPORT": "ssm",
        "BATCHWORKER_SSM_DOCUMENT": DOCUMENT,
        "BATCHWORKER_SSM_OUTPUT_BUCKET": f"{PREFIX}-output",
        "BATCHWORKER_SSM_OUTPUT_PREFIX": "ssm-output/",
        "BATCHWORKER_MAX_JOB_RUNTIME_SECONDS": "14400",
        "BATCHWORKER_DISPATCH_COMMAND_TIMEOUT_SECONDS": "60",
    }
    env.update({f"BATCHWORKER_{k.upper()}": v for k, v in overrides.items()})
    return Settings.from_env(env)


def spec_for(instance_id: str, key: str = HOSTILE_KEY) -> dict:
    job_id = job_id_for(f"{PREFIX}-input", key, "v1")
    return {
        "job_id": job_id,
        "input": {"bucket": f"{PREFIX}-input", "key": key, "version_id": "v1"},
        "output": {"bucket": f"{PREFIX}-output", "prefix": f"jobs/{job_id}/"},
        "package": {"name": "digits", "version": "cd" * 32, "uri": f"s3://{PREFIX}-artifacts/job-packages/d.tar.gz"},
        "instance_id": instance_id,
    }


@pytest.fixture
def aws(monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-east-1")
        ssm.create_document(
            Name=DOCUMENT, Content=json.dumps(DOCUMENT_CONTENT), DocumentType="Command", DocumentFormat="JSON"
        )
        # moto's Run Command checks no instance ids; the handler test below uses a real moto instance.
        yield ssm, ["i-0a1b2c3d4e5f60001", "i-0a1b2c3d4e5f60002"]


def launcher_for(double, fake: FakeTime, **overrides) -> SsmLauncher:
    return SsmLauncher(
        settings_for(**overrides),
        double,
        sleep=fake.sleep,
        clock=fake.clock,
        poll_seconds=1.0,
        jitter=lambda: 0.5,
    )


def assert_matches_document(ssm, document_name: str, parameters: dict) -> None:
    """Every parameter sent is declared by the stored document and matches its allowedPattern whole."""
    declared = json.loads(ssm.get_document(Name=document_name)["Content"])["parameters"]
    for name, values in parameters.items():
        assert name in declared, f"{name} is not a parameter of {document_name}"
        (value,) = values
        assert re.fullmatch(declared[name]["allowedPattern"], value), f"{name}={value[:40]!r}"


def test_launch_sends_the_document_to_exactly_the_instance_with_the_spec_as_data(aws):
    # GIVEN an instance whose agent is Offline for three polls, and a key full of shell text and unicode
    ssm, (instance_id, _) = aws
    double = SsmDouble(ssm, offline_polls=3)
    fake = FakeTime()
    launcher = launcher_for(double, fake)
    spec = spec_for(instance_id)
    # WHEN the job is launched
    launcher.launch(instance_id, spec, deadline=fake.now + 600)
    # THEN it waited for Online by polling (no fixed sleep), and sent one command
    assert double.calls["describe_instance_information"] == 4
    assert fake.sleeps == [1.0, 1.0, 1.0]
    (command,) = ssm.list_commands()["Commands"]
    (request,) = double.sent
    assert request["InstanceIds"] == [instance_id]
    assert "Targets" not in request  # no tag or resource-group targeting: this instance and no other
    assert command["DocumentName"] == DOCUMENT
    assert command["Comment"] == f"batchworker job {spec['job_id']}"
    assert command["OutputS3BucketName"] == f"{PREFIX}-output"
    assert command["OutputS3KeyPrefix"] == "ssm-output/"
    assert 30 <= command["TimeoutSeconds"] <= 600
    # AND the key arrives intact inside the base64 JobSpec, the only place it travels
    parameters = command["Parameters"]
    assert set(parameters) == {"JobSpec", "executionTimeout"}
    decoded = json.loads(base64.b64decode(parameters["JobSpec"][0], validate=True))
    assert decoded == spec
    assert decoded["input"]["key"] == HOSTILE_KEY
    assert parameters["executionTimeout"] == ["14400"]
    assert_matches_document(ssm, DOCUMENT, parameters)
    assert HOSTILE_KEY not in json.dumps(command, default=str)


def test_launch_returns_the_launchers_json_reply(aws):
    ssm, (instance_id, _) = aws
    double = SsmDouble(
        ssm, invocations=[{"StandardOutputContent": 'starting\n{"job_id": "j-1", "pid": 4242}\n'}]
    )
    fake = FakeTime()
    reply = launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)
    assert reply == {"job_id": "j-1", "pid": 4242}


def test_output_bucket_is_optional(aws):
    ssm, (instance_id, _) = aws
    fake = FakeTime()
    settings = dataclasses.replace(settings_for(), ssm_output_bucket=None)
    launcher = SsmLauncher(settings, SsmDouble(ssm), sleep=fake.sleep, clock=fake.clock)
    launcher.launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)
    (command,) = ssm.list_commands()["Commands"]
    assert not command.get("OutputS3BucketName")


def test_never_online_instance_times_out_within_the_deadline(aws):
    # GIVEN an instance whose agent never comes Online and a 0.5 s deadline, on the real clock
    ssm, (instance_id, _) = aws
    launcher = SsmLauncher(settings_for(), SsmDouble(ssm, never_online=True), poll_seconds=0.05)
    started = time.monotonic()
    # WHEN launching THEN InstanceReadyTimeout names the instance and what to check, soon after the deadline
    with pytest.raises(InstanceReadyTimeout, match=instance_id) as raised:
        launcher.launch(instance_id, spec_for(instance_id), deadline=started + 0.5)
    assert time.monotonic() - started < 2.0
    message = str(raised.value)
    assert "SSM agent" in message and "instance profile" in message and "VPC endpoints" in message
    assert "ConnectionLost" in message
    assert ssm.list_commands()["Commands"] == []


def test_failed_invocation_raises_dispatch_error_with_status_and_stderr_tail(aws):
    ssm, (instance_id, _) = aws
    stderr = "x" * 2000 + "\nbatchworker-job: job_id must match ^j-[0-9a-f]{16}$"
    double = SsmDouble(
        ssm,
        invocations=[
            {"Status": "InProgress", "StatusDetails": "InProgress"},
            {
                "Status": "Failed",
                "StatusDetails": "Failed",
                "ResponseCode": 2,
                "StandardErrorContent": stderr,
            },
        ],
    )
    fake = FakeTime()
    with pytest.raises(DispatchError) as raised:
        launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)
    message = str(raised.value)
    assert "Failed" in message and "exit 2" in message and instance_id in message
    assert message.endswith("job_id must match ^j-[0-9a-f]{16}$")
    assert "x" * 600 not in message  # only the tail


@pytest.mark.parametrize(
    "status,details",
    [
        ("Cancelled", "Cancelled"),
        ("TimedOut", "DeliveryTimedOut"),
        ("Failed", "Undeliverable"),
        ("Pending", "Undeliverable"),
        ("InProgress", "Terminated"),
    ],
)
def test_every_terminal_failure_raises(aws, status, details):
    ssm, (instance_id, _) = aws
    double = SsmDouble(ssm, invocations=[{"Status": status, "StatusDetails": details}])
    fake = FakeTime()
    with pytest.raises(DispatchError, match=f"{status} \\({details}"):
        launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)


def test_invocation_not_visible_yet_is_polled_again(aws):
    ssm, (instance_id, _) = aws
    not_yet = client_error("InvocationDoesNotExist", "GetCommandInvocation")
    double = SsmDouble(ssm, fail_first={"get_command_invocation": [not_yet, not_yet]})
    fake = FakeTime()
    launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)
    assert double.calls["get_command_invocation"] == 3


def test_throttling_is_retried_with_backoff_everywhere(aws):
    # GIVEN every SSM call is throttled a few times first
    ssm, (instance_id, _) = aws
    double = SsmDouble(
        ssm,
        fail_first={
            "describe_instance_information": [
                client_error("ThrottlingException", "DescribeInstanceInformation")
            ],
            "send_command": [
                client_error("ThrottlingException", "SendCommand"),
                client_error("TooManyRequestsException", "SendCommand"),
                client_error("InternalServerError", "SendCommand", status=500),
            ],
            "get_command_invocation": [client_error("ThrottlingException", "GetCommandInvocation")],
        },
    )
    fake = FakeTime()
    # WHEN launching THEN the job is sent exactly once, after growing pauses
    launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 600)
    assert double.calls["send_command"] == 4
    assert len(ssm.list_commands()["Commands"]) == 1
    assert fake.sleeps[1:4] == [0.375, 0.75, 1.5]  # base 0.5 doubling, jitter fixed at half


def test_instance_not_yet_known_to_run_command_is_retried(aws):
    ssm, (instance_id, _) = aws
    double = SsmDouble(
        ssm, fail_first={"send_command": [client_error("InvalidInstanceId", "SendCommand")] * 2}
    )
    fake = FakeTime()
    launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)
    assert len(ssm.list_commands()["Commands"]) == 1


def test_throttling_until_the_deadline_gives_up(aws):
    ssm, (instance_id, _) = aws
    double = SsmDouble(
        ssm, fail_first={"send_command": [client_error("ThrottlingException", "SendCommand")] * 1000}
    )
    fake = FakeTime()
    start = fake.now
    with pytest.raises(DispatchError, match="before the deadline"):
        launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=start + 30)
    assert fake.now <= start + 30
    assert max(fake.sleeps) <= 10.0


def test_other_errors_are_permanent(aws):
    ssm, (instance_id, _) = aws
    double = SsmDouble(ssm, fail_first={"send_command": [client_error("InvalidDocument", "SendCommand")]})
    fake = FakeTime()
    with pytest.raises(DispatchError, match="InvalidDocument"):
        launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=fake.now + 60)
    assert double.calls["send_command"] == 1


def test_command_stuck_in_progress_is_cancelled_after_its_own_window(aws):
    # GIVEN the readiness wait used up the deadline, and the command never leaves InProgress
    ssm, (instance_id, _) = aws
    double = SsmDouble(
        ssm, offline_polls=10, invocations=[{"Status": "InProgress", "StatusDetails": "InProgress"}]
    )
    fake = FakeTime()
    start = fake.now
    with pytest.raises(DispatchError, match="did not finish in time.*cancelled it"):
        launcher_for(double, fake).launch(instance_id, spec_for(instance_id), deadline=start + 10.5)
    # THEN it still got dispatch_command_timeout_seconds (60) after sending, and was cancelled
    assert start + 10.5 + 59 <= fake.now <= start + 10.5 + 61
    assert double.cancelled == [
        {"CommandId": ssm.list_commands()["Commands"][0]["CommandId"], "InstanceIds": [instance_id]}
    ]


def test_spec_too_large_is_refused_before_anything_is_sent(aws):
    ssm, (instance_id, _) = aws
    double = SsmDouble(ssm)
    fake = FakeTime()
    spec = spec_for(instance_id, key="k" * 9500)
    with pytest.raises(DispatchError, match="base64 characters"):
        launcher_for(double, fake).launch(instance_id, spec, deadline=fake.now + 60)
    assert double.calls == {}
    assert ssm.list_commands()["Commands"] == []


def test_make_launcher_follows_the_transport_setting(aws):
    ssm, _ = aws
    assert isinstance(make_launcher(settings_for(), ssm), SsmLauncher)
    from batchworker.transports.ssh_launcher import SshLauncher

    assert isinstance(make_launcher(settings_for(transport="ssh"), ssm), SshLauncher)


def test_worker_handler_over_ssm_leaves_the_job_running_and_one_command_sent(stack, monkeypatch):
    # GIVEN the stack switched to the SSM transport, its document, and a queued job with a hostile key
    for name, value in {
        "BATCHWORKER_TRANSPORT": "ssm",
        "BATCHWORKER_SSM_DOCUMENT": DOCUMENT,
        "BATCHWORKER_SSM_OUTPUT_BUCKET": stack.output_bucket,
        "BATCHWORKER_SSM_OUTPUT_PREFIX": "ssm-output/",
        "BATCHWORKER_MAX_JOB_RUNTIME_SECONDS": "7200",
    }.items():
        monkeypatch.setenv(name, value)
    ssm = stack.client("ssm")
    ssm.create_document(
        Name=DOCUMENT, Content=json.dumps(DOCUMENT_CONTENT), DocumentType="Command", DocumentFormat="JSON"
    )
    trigger = load_handler("trigger")
    trigger.lambda_client = RecordingLambdaClient()
    encoded = "in+box%2F%24%28rm+-rf+%7E%29+%3Bx.png"
    trigger.handler(sqs_event(s3_event(stack.input_bucket, encoded, "v1")), LambdaContext())
    job_id = job_id_for(stack.input_bucket, "in box/$(rm -rf ~) ;x.png", "v1")
    # WHEN the worker function runs with an agent that is Offline once, then Online
    worker = load_handler("worker")
    assert isinstance(worker.launcher, SsmLauncher)
    worker.launcher.ssm = double = SsmDouble(worker.launcher.ssm, offline_polls=1)
    worker.launcher.poll_seconds = 0.01
    result = worker.handler({"job_ids": [job_id]}, LambdaContext())
    # THEN the job is on the instance (DISPATCHED with a lease until its code starts) and exactly one command
    # went to it, the key only inside JobSpec
    assert result == {"statuses": {job_id: "DISPATCHED"}}
    assert stack.job_item(job_id)["status"]["S"] == "DISPATCHED" and "lease_expires_at" in stack.job_item(job_id)
    (command,) = ssm.list_commands()["Commands"]
    assert [r["InstanceIds"] for r in double.sent] == [[stack.instance_id]]
    assert command["DocumentName"] == DOCUMENT
    assert command["Parameters"]["executionTimeout"] == ["7200"]
    assert (
        json.loads(base64.b64decode(command["Parameters"]["JobSpec"][0]))["jobs"][0]["input"]["key"]
        == "in box/$(rm -rf ~) ;x.png"
    )
    assert_matches_document(ssm, DOCUMENT, command["Parameters"])


def test_worker_handler_over_ssm_needs_the_document_setting(stack, monkeypatch):
    monkeypatch.setenv("BATCHWORKER_TRANSPORT", "ssm")
    monkeypatch.delenv("BATCHWORKER_SSM_DOCUMENT", raising=False)
    with pytest.raises(ConfigurationError, match="BATCHWORKER_SSM_DOCUMENT"):
        load_handler("worker")


def test_the_document_here_has_the_terraform_documents_parameters_and_patterns():
    path = REPO / "terraform" / "ssm.tf"
    if not path.exists() or "aws_ssm_document" not in path.read_text():
        pytest.skip("terraform/ssm.tf has no aws_ssm_document")
    text = path.read_text()
    patterns = {
        name: pattern.replace("\\\\", "\\")
        for name, pattern in re.findall(
            r'(\w+)\s*=\s*\{[^{}]*?allowedPattern\s*=\s*"((?:[^"\\]|\\.)*)"', text, re.DOTALL
        )
    }
    assert patterns == {name: p["allowedPattern"] for name, p in DOCUMENT_CONTENT["parameters"].items()}
    assert '"{{ executionTimeout }}"' in text and "{{ JobSpec }}" in text


@pytest.mark.parametrize("runtime", ["1", "59", "3600", "86400", "99999", "100000", "172800"])
def test_execution_timeout_matches_the_document_for_every_allowed_runtime(runtime):
    settings = settings_for(max_job_runtime_seconds=runtime)
    pattern = DOCUMENT_CONTENT["parameters"]["executionTimeout"]["allowedPattern"]
    assert re.fullmatch(pattern, execution_timeout(settings))
