"""Where the CLI finds the deployment: flags, then environment, then a running local cloud, then Terraform outputs."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

import boto3

from batchworker.errors import ConfigurationError
from batchworker.local.paths import TERRAFORM_DIR, local_dir
from batchworker.local.state import client_environment, is_ready, read_state

FIELDS = ("input_bucket", "output_bucket", "jobs_table", "instance_events_table", "pool_tag")
# Only the `job` commands need these; they come from the same sources as FIELDS.
OPTIONAL_FIELDS = ("artifacts_bucket",)


@dataclass(frozen=True)
class Deployment:
    input_bucket: str
    output_bucket: str
    jobs_table: str
    instance_events_table: str
    pool_tag: str
    artifacts_bucket: str | None = None
    endpoint_url: str | None = None
    region: str | None = None

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=self.region)

    def require_artifacts_bucket(self) -> str:
        if not self.artifacts_bucket:
            raise ConfigurationError(
                "cannot find the deployment's artifacts bucket (job packages live there): "
                "`eval \"$(batchworker local env)\"`, set BATCHWORKER_ARTIFACTS_BUCKET, or pass --artifacts-bucket"
            )
        return self.artifacts_bucket


def resolve(overrides: dict[str, str | None]) -> Deployment:
    """Each field from the first source that has it; a missing field names how to provide it."""
    sources = [
        {k: v for k, v in overrides.items() if v},
        _from_environment(os.environ),
        _from_local_cloud(),
        _from_terraform(),
    ]
    values: dict[str, str] = {}
    for source in sources:
        for name, value in source.items():
            values.setdefault(name, value)
        if all(name in values for name in FIELDS):
            break
    missing = [name for name in FIELDS if name not in values]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigurationError(
            f"cannot find the deployment's {', '.join(missing)}: start the local cloud (`batchworker local up`), "
            f"`eval \"$(batchworker local env)\"`, run `terraform apply` in terraform/, or pass {flags}"
        )
    return Deployment(
        **{name: values[name] for name in FIELDS},
        **{name: values[name] for name in OPTIONAL_FIELDS if name in values},
        endpoint_url=values.get("endpoint_url"),
        region=values.get("region"),
    )


def _from_environment(environ) -> dict[str, str]:
    found = {
        name: environ["BATCHWORKER_" + name.upper()]
        for name in FIELDS + OPTIONAL_FIELDS
        if environ.get("BATCHWORKER_" + name.upper())
    }
    if environ.get("AWS_ENDPOINT_URL"):
        found["endpoint_url"] = environ["AWS_ENDPOINT_URL"]
    return found


def _from_local_cloud() -> dict[str, str]:
    state = read_state(local_dir())
    if not is_ready(state):
        return {}
    env = client_environment(state)
    found = _from_environment(env)
    found["region"] = env["AWS_DEFAULT_REGION"]
    for name, value in env.items():
        if name.startswith("AWS_") and name != "AWS_ENDPOINT_URL":
            os.environ.setdefault(name, value)  # the local cloud's fake credentials
    return found


def _from_terraform() -> dict[str, str]:
    """Outputs of an AWS deployment applied from terraform/ (default state)."""
    if not (TERRAFORM_DIR / "terraform.tfstate").exists():
        return {}
    try:
        result = subprocess.run(
            ["terraform", "output", "-json"], cwd=TERRAFORM_DIR, capture_output=True, text=True, timeout=60, check=True
        )
        outputs = {name: value["value"] for name, value in json.loads(result.stdout).items()}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
    found = {name: outputs[name] for name in FIELDS + OPTIONAL_FIELDS if isinstance(outputs.get(name), str)}
    if outputs.get("region"):
        found["region"] = outputs["region"]
    return found
