"""Record the AWS API calls a real local run makes per job, by component: the load model's check.

Starts a local cloud, turns on moto's request recorder, runs three scenarios and counts every recorded request
by component (the User-Agent app id the local cloud gives each Lambda and the instance's job) and API:
- burst: N digit images uploaded at once (one instance start shared by the burst);
- large_burst: 3N of them at once (per job, the calls should not grow with the burst);
- single: M images one at a time, each after the pool stopped again (a start and a stop per job).
Writes the counts, per job and per reaper pass, as JSON (default: docs/scaling-recorded.json), which
`batchworker simulate --load --recorded FILE` compares with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config
from rich.console import Console

from batchworker.costs.calls import count_calls
from batchworker.local import cloud
from batchworker.local.paths import REPO_ROOT
from batchworker.local.state import LocalOptions, client_environment, read_state
from batchworker.models import job_id_for

console = Console(stderr=True)
SAMPLE = REPO_ROOT / "samples" / "digit-3.png"
OPTIONS = LocalOptions(boot_delay_seconds=3, schedule_speedup=4, instance_count=2, max_jobs_per_instance=4)


class Run:
    def __init__(self, local_dir: Path):
        self.local_dir = local_dir
        state = read_state(local_dir)
        self.env = client_environment(state)
        self.endpoint = self.env["AWS_ENDPOINT_URL"]
        # This script's own calls carry no app id: they count as "other", never as a component's.
        session = boto3.Session(aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                region_name=self.env["AWS_DEFAULT_REGION"])
        config = Config(retries={"mode": "standard"})
        self.s3 = session.client("s3", endpoint_url=self.endpoint, config=config)
        self.ddb = session.client("dynamodb", endpoint_url=self.endpoint, config=config)
        self.ec2 = session.client("ec2", endpoint_url=self.endpoint, config=config)

    def recorder(self, action: str) -> bytes:
        method = "GET" if action == "download-recording" else "POST"
        request = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", method=method, data=None)
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def put(self, key: str) -> str:
        response = self.s3.put_object(Bucket=self.env["BATCHWORKER_INPUT_BUCKET"], Key=key, Body=SAMPLE.read_bytes())
        return job_id_for(self.env["BATCHWORKER_INPUT_BUCKET"], key, response.get("VersionId") or response.get("ETag"))

    def wait_done(self, job_ids: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        pending = set(job_ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                item = self.ddb.get_item(TableName=self.env["BATCHWORKER_JOBS_TABLE"], Key={"job_id": {"S": job_id}},
                                         ConsistentRead=True).get("Item", {})
                if item.get("status", {}).get("S") in ("SUCCEEDED", "FAILED"):
                    pending.discard(job_id)
            time.sleep(1)
        if pending:
            raise SystemExit(f"jobs not done in {timeout}s: {sorted(pending)}")

    def wait_stopped(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {i["State"]["Name"] for r in self.ec2.describe_instances(
                Filters=[{"Name": "tag:batchworker:pool", "Values": [self.env["BATCHWORKER_POOL_TAG"]]}]
            )["Reservations"] for i in r["Instances"]}
            if states == {"stopped"}:
                return
            time.sleep(1)
        raise SystemExit(f"the pool did not stop within {timeout}s")

    def scenario(self, name: str, uploads: list[list[str]]) -> dict:
        """Each inner list is uploaded at once; the pool is stopped before each."""
        self.wait_stopped()
        self.recorder("reset-recording")
        self.recorder("start-recording")
        started = time.monotonic()
        jobs = 0
        for keys in uploads:
            job_ids = [self.put(key) for key in keys]
            self.wait_done(job_ids)
            self.wait_stopped()
            jobs += len(job_ids)
        elapsed = time.monotonic() - started
        self.recorder("stop-recording")
        recording = self.recorder("download-recording").decode()
        (self.local_dir / f"recording-{name}.jsonl").write_text(recording)
        counts = count_calls(recording.splitlines())
        reaper_passes = counts.get("reaper", {}).get("ec2:DescribeInstances", 0)
        console.print(f"  {name}: {jobs} jobs in {elapsed:.0f}s, {reaper_passes} reaper pass(es)")
        return {
            "jobs": jobs,
            "elapsed_s": round(elapsed, 1),
            "reaper_passes": reaper_passes,
            "calls": {component: dict(sorted(c.items())) for component, c in sorted(counts.items())},
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=16, help="uploads in the burst scenario (default: 16)")
    parser.add_argument("--singles", type=int, default=3, help="uploads one at a time (default: 3)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "scaling-recorded.json")
    args = parser.parse_args()
    local_dir = Path(os.environ.get("BATCHWORKER_LOCAL_DIR") or REPO_ROOT / ".local-cloud") / "record-calls"
    local_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MOTO_RECORDER_FILEPATH"] = str(local_dir / "moto-recording.jsonl")  # the supervisor inherits it
    cloud.up(local_dir, OPTIONS, progress=lambda phase: console.print(f"  local cloud: {phase}"))
    try:
        run = Run(local_dir)
        tag = f"{int(time.time())}"
        result = {
            "options": json.loads(OPTIONS.to_json()),
            "burst": run.scenario("burst", [[f"record/{tag}/burst-{n}.png" for n in range(args.burst)]]),
            "large_burst": run.scenario("large_burst",
                                        [[f"record/{tag}/large-{n}.png" for n in range(3 * args.burst)]]),
            "single": run.scenario("single", [[f"record/{tag}/single-{n}.png"] for n in range(args.singles)]),
        }
    finally:
        cloud.down(local_dir)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
