"""The local cloud's state file: what is running, where, and the Terraform outputs clients need."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from batchworker.local import processes

LOCAL_REGION = "us-east-1"
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass(frozen=True)
class LocalOptions:
    """Knobs of one local cloud; the Terraform ones become variables of the same name."""

    boot_delay_seconds: float = 3.0  # from `running` in moto until the instance host accepts SSH
    schedule_speedup: float = 1.0  # EventBridge schedules fire this many times faster
    idle_grace_seconds: float = 0.0  # Terraform: keep an idle instance this long (0: stop at once)
    instance_count: int = 1  # Terraform: size of the pool
    max_jobs_per_instance: int = 4  # Terraform: concurrent jobs per instance
    job_lease_seconds: float = 90.0  # Terraform: a job that stops renewing its lease this long is failed
    max_job_runtime_seconds: float = 3600.0  # Terraform: the reaper fails jobs running longer
    max_attempts: int = 3  # Terraform: dispatches of a job before it is failed
    # Faults AWS has and moto hides (issue 14). GSI queries answer from a view this many seconds old
    # (batchworker/local/gsi_lag.py); 0: exact, as moto is.
    gsi_lag_seconds: float = 0.0

    TERRAFORM_FIELDS = (
        "idle_grace_seconds", "instance_count", "max_jobs_per_instance", "job_lease_seconds",
        "max_job_runtime_seconds", "max_attempts",
    )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LocalOptions:
        return cls(**json.loads(text))

    def terraform_variables(self) -> dict:
        return {name: getattr(self, name) for name in self.TERRAFORM_FIELDS}


def state_path(local_dir: Path) -> Path:
    return local_dir / "state.json"


def read_state(local_dir: Path) -> dict | None:
    try:
        return json.loads(state_path(local_dir).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_state(local_dir: Path, state: dict) -> None:
    local_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_path(local_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_path(local_dir))


def is_running(state: dict | None) -> bool:
    """The one liveness check of a local cloud: its supervisor is alive, not a zombie, and this cloud's own."""
    pid = (state or {}).get("pid")
    if not pid or not processes.is_running(pid):
        return False
    return not state.get("cloud_id") or processes.carries_marker(pid, state["cloud_id"])


def is_ready(state: dict | None) -> bool:
    return bool(state) and state.get("status") == "ready" and is_running(state)


def client_environment(state: dict) -> dict[str, str]:
    """The variables that point boto3, the AWS CLI and `batchworker` at the local cloud."""
    outputs = state["outputs"]
    return {
        "AWS_ENDPOINT_URL": state["endpoint_url"],
        **LOCAL_CREDENTIALS,
        "AWS_DEFAULT_REGION": state.get("region", LOCAL_REGION),
        "BATCHWORKER_INPUT_BUCKET": outputs["input_bucket"],
        "BATCHWORKER_OUTPUT_BUCKET": outputs["output_bucket"],
        "BATCHWORKER_JOBS_TABLE": outputs["jobs_table"],
        "BATCHWORKER_INSTANCE_EVENTS_TABLE": outputs["instance_events_table"],
        "BATCHWORKER_POOL_TAG": outputs["pool_tag"],
        "BATCHWORKER_ARTIFACTS_BUCKET": outputs["artifacts_bucket"],
    }
