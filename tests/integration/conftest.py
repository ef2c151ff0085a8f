"""One local cloud for the integration tests: moto server over HTTP, terraform apply, Lambda runtime, SSH hosts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from batchworker.iamcheck.check import CALL_LOG_DIR, STATE_COPY
from batchworker.local import call_log, processes
from batchworker.local.state import read_state

CLI = str(Path(sys.executable).parent / "batchworker")
RESTART_TEST = "test_restart.py::test_local_down_then_up_at_once_three_times"
RESTART_CYCLES = pytest.StashKey[tuple[subprocess.Popen, Path]]()


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: start the cycles only when their test will run
def pytest_collection_modifyitems(session, config, items):
    """The restart cycles run in the background from the start (four `local up`, ~1.5 min each, mostly Terraform
    waiting); their test runs last and checks them, so they cost the suite little wall time. The IAM check's
    tests run just before it: they evaluate the calls the other integration tests recorded."""
    items.sort(key=lambda item: item.path.name == "test_iam_check.py")
    restart = [item for item in items if item.nodeid.endswith(RESTART_TEST)]
    if not restart or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in restart] + restart
    work = Path(tempfile.mkdtemp(prefix="batchworker-restart-cycles-"))
    log = open(work / "cycles.log", "wb")  # noqa: SIM115 - the background process writes to it
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.restart_cycles", "--local-dir", str(work / "local-cloud"),
         "--report", str(work / "report.json")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(Path(__file__).parents[2]),
    )
    config.stash[RESTART_CYCLES] = (process, work)


@dataclass
class LocalCloud:
    env: dict[str, str]
    local_dir: Path

    def client(self, service: str):
        return boto3.client(
            service, endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    @property
    def input_bucket(self) -> str:
        return self.env["BATCHWORKER_INPUT_BUCKET"]

    @property
    def output_bucket(self) -> str:
        return self.env["BATCHWORKER_OUTPUT_BUCKET"]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        # Its AWS calls are recorded as the command's (cli:submit, ...) for the client/operator policies.
        env = call_log.child_environment({**os.environ, **self.env, "BATCHWORKER_LOCAL_DIR": str(self.local_dir)},
                                         f"cli:{args[0]}")
        return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)

    def instance_states(self) -> list[str]:
        reservations = self.client("ec2").describe_instances(
            Filters=[{"Name": "tag:batchworker:pool", "Values": [self.env["BATCHWORKER_POOL_TAG"]]}]
        )["Reservations"]
        return sorted(i["State"]["Name"] for r in reservations for i in r["Instances"])

    def wait_for_manifest(self, job_id: str, timeout: float = 180) -> dict:
        s3 = self.client("s3")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                body = s3.get_object(Bucket=self.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read()
                return json.loads(body)
            except s3.exceptions.NoSuchKey:
                time.sleep(0.5)
        raise AssertionError(f"no manifest for {job_id} within {timeout}s; status: {self.cli('status', job_id).stdout}")

    def wait_until(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def job(self, job_id: str) -> dict | None:
        item = self.client("dynamodb").get_item(
            TableName=self.env["BATCHWORKER_JOBS_TABLE"], Key={"job_id": {"S": job_id}}, ConsistentRead=True
        ).get("Item")
        return {k: next(iter(v.values())) for k, v in item.items()} if item else None

    def host_logs(self) -> str:
        logs = sorted((self.local_dir / "logs").glob("*.log")) + sorted((self.local_dir / "lambda-runtime" / "logs").glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


@pytest.fixture(scope="session")
def local_cloud(tmp_path_factory) -> LocalCloud:
    local_dir = tmp_path_factory.mktemp("local-cloud")
    # Every AWS call of the Lambda handlers, the instance jobs and the CLI goes to the call log that
    # `make iam-check` evaluates against the policies this session's terraform apply rendered.
    shutil.rmtree(CALL_LOG_DIR, ignore_errors=True)
    STATE_COPY.unlink(missing_ok=True)
    # BATCHWORKER_PIP_ARGS: job package environments are built from what is installed, never an index
    env = {**os.environ, "BATCHWORKER_LOCAL_DIR": str(local_dir), "BATCHWORKER_PIP_ARGS": "--no-index",
           call_log.LOG_VARIABLE: str(CALL_LOG_DIR)}
    # A fast clock for the faults: leases of 6 s, the reaper every 3 s, jobs capped at 40 s, and one
    # attempt per job so that a lost job ends failed at once (retries are covered by the soak).
    options = ["--boot-delay-seconds", "1", "--job-lease-seconds", "6", "--schedule-speedup", "20",
               "--max-job-runtime-seconds", "40", "--max-attempts", "1"]
    up = subprocess.run([CLI, "local", "up", *options], capture_output=True, text=True,
                        timeout=600, env=env)
    assert up.returncode == 0, f"local up failed:\n{up.stdout}\n{up.stderr}"
    exported = subprocess.run([CLI, "local", "env"], capture_output=True, text=True, timeout=60, env=env, check=True)
    values = {}
    for line in exported.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        values[name] = shlex.split(value)[0]
    values[call_log.LOG_VARIABLE] = str(CALL_LOG_DIR)  # LocalCloud.cli records the CLI's calls there too
    cloud_id = read_state(local_dir)["cloud_id"]
    shutil.copyfile(local_dir / "terraform" / "terraform.tfstate", STATE_COPY)
    try:
        yield LocalCloud(values, local_dir)
    finally:
        subprocess.run([CLI, "local", "down"], capture_output=True, text=True, timeout=120, env=env)
        assert processes.processes_marked(cloud_id) == [], "local down left processes behind"
