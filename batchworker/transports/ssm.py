"""SSM Run Command transport: start a job on an instance through the `<prefix>-run-job` document.

The job spec travels as one base64 document parameter (checked against the document's allowedPattern
before sending), so an object key can never become shell text on the instance.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from batchworker import aws
from batchworker.config import Settings
from batchworker.errors import ConfigurationError, DispatchError, InstanceReadyTimeout

logger = logging.getLogger(__name__)

# The document's allowedPattern for JobSpec (terraform/ssm.tf); matched whole, as SSM does.
JOB_SPEC_PATTERN = r"^[A-Za-z0-9+/]{4,12000}={0,2}$"
_JOB_SPEC_RE = re.compile(JOB_SPEC_PATTERN)
MAX_JOB_SPEC_CHARS = 12_002  # 12,000 base64 characters plus at most two "=" of padding
MIN_DELIVERY_TIMEOUT_SECONDS = 30  # the smallest TimeoutSeconds send_command accepts
MAX_COMMENT_CHARS = 100

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
    }
)
SERVER_ERROR_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
# get_command_invocation: Status values that mean "not finished yet".
PENDING_STATUSES = frozenset({"Pending", "InProgress", "Delayed", "Cancelling"})
# StatusDetails that end an invocation even while Status still reads as pending.
TERMINAL_DETAILS = frozenset({"Undeliverable", "Terminated", "InvalidPlatform", "AccessDenied"})


def encode_job_spec(spec: dict) -> str:
    """The spec as the JobSpec parameter: base64 of ASCII-only JSON (non-ASCII escaped as \\uXXXX).

    ASCII keeps the decoded text independent of the instance's locale; base64 keeps every byte of
    it out of the shell. Raises DispatchError when the result does not fit the document's pattern.
    """
    text = json.dumps(spec, ensure_ascii=True, separators=(",", ":"))
    encoded = base64.b64encode(text.encode("ascii")).decode("ascii")
    if len(encoded) > MAX_JOB_SPEC_CHARS:
        raise DispatchError(
            f"job spec of job {spec.get('job_id')} is {len(encoded)} base64 characters, more than the "
            f"{MAX_JOB_SPEC_CHARS} the SSM document accepts: shorten the object key or model URI"
        )
    if not is_valid_job_spec(encoded):
        raise DispatchError(f"job spec of job {spec.get('job_id')} does not match the document's pattern")
    return encoded


def is_valid_job_spec(value: str) -> bool:
    return _JOB_SPEC_RE.fullmatch(value) is not None


def decode_job_spec(value: str) -> dict:
    return json.loads(base64.b64decode(value, validate=True))


def execution_timeout(settings: Settings) -> str:
    return str(max(1, math.ceil(settings.max_job_runtime_seconds)))


def is_retryable(exc: ClientError) -> bool:
    """Throttling and server-side errors: trying again after a pause may succeed."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return aws.error_code(exc) in THROTTLING_CODES | SERVER_ERROR_CODES or status >= 500


class SsmLauncher:
    """`launch()` waits until the instance is Online in SSM, sends the run-job command, waits for its result.

    Every wait is bounded by the `deadline` given to launch(); only throttling, server errors and the
    short windows right after registration (InvalidInstanceId) and after sending (InvocationDoesNotExist)
    are retried, everything else fails the dispatch at once.
    """

    # JobSpec is base64 of ASCII JSON and the document allows 12,000 base64 characters.
    max_spec_bytes = 12_000 * 3 // 4 - 64

    def __init__(
        self,
        settings: Settings,
        ssm_client: Any,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 2.0,
        backoff_base_seconds: float = 0.5,
        backoff_cap_seconds: float = 10.0,
        jitter: Callable[[], float] = random.random,
    ):
        if not settings.ssm_document:
            raise ConfigurationError(
                "environment variable BATCHWORKER_SSM_DOCUMENT is not set: the SSM transport needs "
                "the name of the run-job document (`<prefix>-run-job`); "
                "set BATCHWORKER_TRANSPORT=ssh to use SSH instead"
            )
        self.settings = settings
        self.ssm = ssm_client
        self.sleep = sleep
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.jitter = jitter

    def launch(self, instance_id: str, spec: dict, deadline: float) -> dict:
        job_spec = encode_job_spec(spec)
        self.wait_until_online(instance_id, deadline)
        command_id = self.send(instance_id, spec.get("job_id", "?"), job_spec, deadline)
        # Once sent, the command gets at least dispatch_command_timeout_seconds to report, as over SSH:
        # giving up on a command that is about to start the job would fail a job that then runs.
        command_deadline = max(deadline, self.clock() + self.settings.dispatch_command_timeout_seconds)
        return self.wait_for_result(command_id, instance_id, command_deadline)

    def wait_until_online(self, instance_id: str, deadline: float) -> None:
        """Return once SSM reports the instance's agent Online; InstanceReadyTimeout at the deadline."""
        last_seen = "not registered with SSM yet"
        attempt = 0
        while True:
            try:
                response = self.ssm.describe_instance_information(
                    Filters=[{"Key": "InstanceIds", "Values": [instance_id]}]
                )
            except ClientError as exc:
                if not is_retryable(exc):
                    raise DispatchError(f"cannot look up instance {instance_id} in SSM: {exc}") from exc
                last_seen = f"SSM lookups failing: {aws.error_code(exc)}"
                attempt += 1
                if not self._pause(self._backoff(attempt), deadline):
                    raise self._not_online(instance_id, last_seen) from exc
                continue
            except BotoCoreError as exc:
                raise DispatchError(f"cannot look up instance {instance_id} in SSM: {exc}") from exc
            attempt = 0
            infos = [
                i for i in response.get("InstanceInformationList", []) if i.get("InstanceId") == instance_id
            ]
            if infos:
                ping = infos[0].get("PingStatus", "unknown")
                if ping == "Online":
                    return
                last_seen = f"SSM agent PingStatus {ping}"
            if not self._pause(self.poll_seconds, deadline):
                raise self._not_online(instance_id, last_seen)

    def send(self, instance_id: str, job_id: str, job_spec: str, deadline: float) -> str:
        """Send the run-job command to exactly this instance; returns the command id."""
        request: dict[str, Any] = {
            "DocumentName": self.settings.ssm_document,
            "InstanceIds": [instance_id],
            "Parameters": {"JobSpec": [job_spec], "executionTimeout": [execution_timeout(self.settings)]},
            "Comment": f"batchworker job {job_id}"[:MAX_COMMENT_CHARS],
        }
        if self.settings.ssm_output_bucket:
            request["OutputS3BucketName"] = self.settings.ssm_output_bucket
            if self.settings.ssm_output_prefix:
                request["OutputS3KeyPrefix"] = self.settings.ssm_output_prefix
        attempt = 0
        while True:
            # Delivery timeout: the time left, but never below what SSM accepts.
            request["TimeoutSeconds"] = max(MIN_DELIVERY_TIMEOUT_SECONDS, math.ceil(deadline - self.clock()))
            try:
                command_id = self.ssm.send_command(**request)["Command"]["CommandId"]
            except ClientError as exc:
                code = aws.error_code(exc)
                # InvalidInstanceId: the agent reported Online but Run Command does not know it yet, or
                # the instance is between states; it settles within seconds.
                if not (is_retryable(exc) or code == "InvalidInstanceId"):
                    raise DispatchError(
                        f"SSM refused to send the job to instance {instance_id} ({code}): {exc}; "
                        f"check that document {self.settings.ssm_document} exists and the worker "
                        "function's role may run it on the instance"
                    ) from exc
                attempt += 1
                if not self._pause(self._backoff(attempt), deadline):
                    raise DispatchError(
                        f"could not send the job to instance {instance_id} before the deadline "
                        f"(last error: {code})"
                    ) from exc
                continue
            except BotoCoreError as exc:
                raise DispatchError(f"could not send the job to instance {instance_id}: {exc}") from exc
            logger.info("sent job %s to instance %s as SSM command %s", job_id, instance_id, command_id)
            return command_id

    def wait_for_result(self, command_id: str, instance_id: str, deadline: float) -> dict:
        """Poll the invocation until it ends: the launcher's JSON reply on success, else DispatchError."""
        status = "not visible yet"
        attempt = 0
        while True:
            try:
                invocation = self.ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
            except ClientError as exc:
                code = aws.error_code(exc)
                if code == "InvocationDoesNotExist":  # normal for a moment right after send_command
                    delay = self.poll_seconds
                elif is_retryable(exc):
                    attempt += 1
                    delay = self._backoff(attempt)
                else:
                    raise DispatchError(
                        f"cannot read SSM command {command_id} on {instance_id}: {exc}"
                    ) from exc
                if not self._pause(delay, deadline):
                    raise self._command_timeout(command_id, instance_id, status) from exc
                continue
            except BotoCoreError as exc:
                raise DispatchError(f"cannot read SSM command {command_id} on {instance_id}: {exc}") from exc
            attempt = 0
            status = invocation.get("Status", "")
            details = invocation.get("StatusDetails", "")
            if status == "Success":
                return parse_launch_reply(invocation.get("StandardOutputContent", ""))
            if status not in PENDING_STATUSES or details in TERMINAL_DETAILS:
                raise DispatchError(_failure_message(command_id, instance_id, invocation))
            if not self._pause(self.poll_seconds, deadline):
                raise self._command_timeout(command_id, instance_id, status)

    def _pause(self, seconds: float, deadline: float) -> bool:
        """Sleep up to `seconds` but never past the deadline; False, without sleeping, once it has passed."""
        remaining = deadline - self.clock()
        if remaining <= 0:
            return False
        self.sleep(min(seconds, remaining))
        return True

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half the step fixed, half random."""
        step = min(self.backoff_cap_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
        return step / 2 + step / 2 * self.jitter()

    def _not_online(self, instance_id: str, last_seen: str) -> InstanceReadyTimeout:
        return InstanceReadyTimeout(
            f"instance {instance_id} did not come Online in SSM within "
            f"{self.settings.instance_ready_timeout_seconds:.0f}s ({last_seen}): check that the SSM agent "
            "runs on the image, the instance profile grants the agent's permissions (those of "
            "AmazonSSMManagedInstanceCore), and the subnet "
            "reaches SSM (internet/NAT or the ssm, ssmmessages and ec2messages VPC endpoints)"
        )

    def _command_timeout(self, command_id: str, instance_id: str, status: str) -> DispatchError:
        try:
            self.ssm.cancel_command(CommandId=command_id, InstanceIds=[instance_id])
            outcome = "cancelled it"
        except Exception as exc:  # best effort: a failed cancel must not hide the timeout itself
            outcome = f"could not cancel it: {exc!r}"
        return DispatchError(
            f"SSM command {command_id} on instance {instance_id} did not finish in time (last status: "
            f"{status}); {outcome}, but a launch already under way may still start the job there"
        )


def parse_launch_reply(stdout: str) -> dict:
    """The last line of stdout that is a JSON object (`{"job_id", "pid"}`), or {} when there is none."""
    for line in reversed(stdout.splitlines()):
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        if isinstance(reply, dict):
            return reply
    logger.warning("job launcher printed no JSON reply: %r", stdout[-200:])
    return {}


def _failure_message(command_id: str, instance_id: str, invocation: dict) -> str:
    status = invocation.get("Status", "?")
    details = invocation.get("StatusDetails", "?")
    code = invocation.get("ResponseCode", "?")
    stderr = (invocation.get("StandardErrorContent") or "").strip()[-500:]
    message = (
        f"job launcher on instance {instance_id} ended {status} ({details}, exit {code}) "
        f"in SSM command {command_id}"
    )
    if stderr:
        message += f": {stderr}"
    url = invocation.get("StandardErrorUrl")
    if url:
        message += f" (full output: {url})"
    return message
