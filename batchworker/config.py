"""Settings of the Lambda functions, read from the environment in exactly one place."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from batchworker.errors import ConfigurationError
from batchworker.jobpkg.config import NAME_PATTERN

ENV_PREFIX = "BATCHWORKER_"
TRANSPORTS = ("ssm", "ssh")
IDLE_GRACE_POLICIES = ("adaptive", "fixed")
# SSM Run Command caps a command's execution timeout at 48 hours.
SSM_MAX_EXECUTION_TIMEOUT_SECONDS = 172_800


@dataclass(frozen=True)
class Settings:
    """Deployment settings; each field `x` comes from `BATCHWORKER_X` (Terraform variable `x` sets it)."""

    input_bucket: str
    output_bucket: str
    jobs_table: str
    instance_events_table: str
    pool_tag: str
    worker_function: str
    parameter_prefix: str
    job_command: str
    # Job packages live here (job-packages/<name>/): every job runs one, so a deployment cannot do without it.
    artifacts_bucket: str
    ssh_user: str = "ubuntu"
    instance_ready_timeout_seconds: float = 600.0
    dispatch_command_timeout_seconds: float = 60.0
    # How the worker function starts a job on the instance: "ssm" (Run Command) or "ssh".
    transport: str = "ssm"
    # The run-job document (`<prefix>-run-job`); the worker function requires it when transport is "ssm".
    ssm_document: str | None = None
    # Where Run Command writes the command's output (inline output is cut at 24,000 characters).
    ssm_output_bucket: str | None = None
    ssm_output_prefix: str = "ssm-output/"
    max_job_runtime_seconds: float = 3600.0
    # A job for which no instance of the pool can start (InsufficientInstanceCapacity in every AZ) stays
    # QUEUED this long, then fails with a manifest that says so.
    max_capacity_wait_seconds: float = 3600.0
    # Final jobs' rows and instance events expire (DynamoDB TTL `expires_at`) after this many days.
    job_retention_days: float = 90.0
    # A warm instance waits at most this long for more work before it stops (the reaper enforces it).
    idle_grace_seconds: float = 0.0
    # "adaptive": wait as long as recent gaps between idle and the next upload made worthwhile (at most
    # idle_grace_seconds; 0 for isolated jobs); "fixed": always idle_grace_seconds.
    idle_grace_policy: str = "adaptive"
    # What a stop and a restart cost in billed seconds (the boot): 60-120 s for a GPU AMI that registers
    # with SSM; the adaptive grace weighs waiting against it.
    restart_cost_seconds: float = 90.0
    # A running job renews its lease in the job table; a lease older than this means the job is lost.
    job_lease_seconds: float = 90.0
    # Jobs an instance runs at once; more wait on it for a slot (or start another instance of the pool).
    max_jobs_per_instance: int = 4
    # Larger uploads fail before any instance starts (the job itself refuses more than 100 MiB).
    max_input_bytes: int = 100 * 1024 * 1024
    # Dispatch attempts before a job that never started is failed.
    max_attempts: int = 3
    # Uploads under `<name>/` of a deployed package run it, the others default_job. No default_job: the others
    # fail at once (nothing runs them).
    default_job: str | None = None
    # EC2 "Instance State-change Notification" events reach the worker function (terraform/events.tf): a
    # dispatcher never waits through a boot; the instance's `running` event brings one back for its jobs.
    instance_state_events: bool = False

    @property
    def stuck_after_seconds(self) -> float:
        """A job still queued or dispatched after this long is dispatched again (the reaper)."""
        return self.instance_ready_timeout_seconds + 120.0

    @property
    def ssh_private_key_parameter(self) -> str:
        return f"{self.parameter_prefix}/ssh/private-key"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = environ.get(name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if raw is None or raw == "":
                if required:
                    raise ConfigurationError(f"environment variable {name} is not set")
                continue
            values[f.name] = _convert(name, raw, f.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Rules across fields; raises ConfigurationError naming the environment variable to fix."""
        if self.transport not in TRANSPORTS:
            raise ConfigurationError(
                f"{ENV_PREFIX}TRANSPORT must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}"
            )
        if self.idle_grace_policy not in IDLE_GRACE_POLICIES:
            raise ConfigurationError(
                f"{ENV_PREFIX}IDLE_GRACE_POLICY must be one of {', '.join(IDLE_GRACE_POLICIES)}, "
                f"got {self.idle_grace_policy!r}"
            )
        if self.default_job is not None and not NAME_PATTERN.match(self.default_job):
            raise ConfigurationError(
                f"{ENV_PREFIX}DEFAULT_JOB must be a job package name (^[a-z][a-z0-9-]{{0,39}}$), "
                f"got {self.default_job!r}"
            )
        if self.max_job_runtime_seconds <= 0:
            raise ConfigurationError(f"{ENV_PREFIX}MAX_JOB_RUNTIME_SECONDS must be > 0")
        # ssm_document is checked where it is used (SsmLauncher), so trigger and stop do not need it.
        if self.transport == "ssm" and self.max_job_runtime_seconds > SSM_MAX_EXECUTION_TIMEOUT_SECONDS:
            raise ConfigurationError(
                f"{ENV_PREFIX}MAX_JOB_RUNTIME_SECONDS must be <= {SSM_MAX_EXECUTION_TIMEOUT_SECONDS} "
                "(the SSM Run Command limit) when the transport is ssm"
            )


def _convert(name: str, raw: str, type_name: object) -> object:
    if type_name in ("bool", bool):
        if raw.lower() not in ("true", "false"):
            raise ConfigurationError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() == "true"
    if type_name in ("float", float, "int", int):
        number = int if type_name in ("int", int) else float
        try:
            value = number(raw)
        except ValueError as exc:
            raise ConfigurationError(f"{name} must be a number, got {raw!r}") from exc
        if value < 0:
            raise ConfigurationError(f"{name} must be >= 0, got {raw!r}")
        return value
    return raw
