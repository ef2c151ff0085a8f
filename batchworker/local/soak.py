"""A soak run against a running local cloud: a burst of uploads, duplicated events, injected faults.

Used by `make soak` (1000 uploads) and by a smaller run inside `make test`. Counts what a user cares
about: every upload ends with exactly one manifest, no job runs twice, no instance is left running. With
job packages, a share of the uploads goes to them (their sample/ files) and the first one is deployed again
halfway through: each of its jobs must run, and name, a version that was current while the burst ran.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import numpy as np

from batchworker.jobpkg.config import load_job_config
from batchworker.jobpkg.registry import PackageRegistry
from batchworker.local import processes
from batchworker.local.capacity_faults import refuse_capacity
from batchworker.local.state import client_environment, read_state
from batchworker.models import job_id_for, parse_time

CAPACITY_OUTAGE = "capacity outage in one AZ"
CAPACITY_OUTAGE_SECONDS = 90.0
# A stop decided just before a placement may be recorded just after it (the EC2 call between): not a miss.
PLACED_SLACK_SECONDS = 0.5

BAD_INPUTS = {
    "bad/corrupt.png": b"\x89PNG\r\n\x1a\nthis is not a png",
    "bad/short-row.csv": (",".join(["1"] * 63) + "\n").encode(),
    "bad/empty.csv": b"",
    "bad/unknown.exe": b"MZ\x90\x00",
    "bad/not-compute.json": b'{"workload": "mine bitcoin"}',
}


def _pickled_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _traversal_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../etc/evil.png", b"\x89PNG\r\n\x1a\n")
    return buffer.getvalue()


def _good_csv(rng: random.Random) -> bytes:
    rows = [",".join(str(rng.randint(0, 16)) for _ in range(64)) for _ in range(rng.randint(1, 5))]
    return ("\n".join(rows) + "\n").encode()


def is_lost_job_error(error: str | None) -> bool:
    """The failure of a job the control plane gave up on (its lease lapsed) or that an instance stop ended."""
    return bool(error) and ("stopped reporting progress" in error or "interrupted" in error)


@dataclass
class SoakReport:
    uploads: int = 0
    duplicate_deliveries: int = 0
    manifests: int = 0
    succeeded: int = 0
    failed: int = 0
    unexpected_failures: list[str] = field(default_factory=list)
    duplicate_runs: int = 0
    lost: list[str] = field(default_factory=list)
    bad_inputs_tried: int = 0
    bad_inputs_failed_clearly: int = 0
    faults_injected: list[str] = field(default_factory=list)
    # stops the control plane made while a job was placed on the instance (placed more than
    # PLACED_SLACK_SECONDS before the stop, finished after it): each costs a restart and delays the job
    stops_under_placed_jobs: int = 0
    instance_states: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    # name -> version -> manifests that named it (jobs of job packages); versions deployed per name
    package_runs: dict[str, dict[str, int]] = field(default_factory=dict)
    package_versions: dict[str, list[str]] = field(default_factory=dict)
    # jobs active on an instance when a stop or kill fault hit it: the only ones that may fail as lost
    fault_exposed: set[str] = field(default_factory=set)
    # lost-job failures ("stopped reporting progress", "interrupted") of jobs no fault hit: a waiting or
    # running job whose lease lapsed on a healthy instance (must be none)
    lost_without_fault: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("uploads", str(self.uploads)),
            ("events delivered twice", str(self.duplicate_deliveries)),
            ("manifests", str(self.manifests)),
            ("succeeded / failed", f"{self.succeeded} / {self.failed}"),
            ("unexpected failures", str(len(self.unexpected_failures))),
            ("duplicate runs", str(self.duplicate_runs)),
            ("lost jobs", str(len(self.lost))),
            ("bad inputs tried / failed with a clear error", f"{self.bad_inputs_tried} / {self.bad_inputs_failed_clearly}"),
            ("faults injected (all survived: no lost job)", ", ".join(self.faults_injected) or "none"),
            ("jobs a stop/kill fault hit / failed as lost without one",
             f"{len(self.fault_exposed)} / {len(self.lost_without_fault)}"),
            ("stops landing on an instance with a placed job", str(self.stops_under_placed_jobs)),
            ("package jobs per version (deployed mid-burst: second)", "; ".join(
                f"{name}: " + ", ".join(f"{v[:8]}={runs.get(v, 0)}" for v in self.package_versions.get(name, []))
                for name, runs in sorted(self.package_runs.items())) or "none"),
            ("final instance states", ", ".join(self.instance_states)),
            ("wall time", f"{self.wall_time_s:.1f}s"),
        ]


class Soak:
    def __init__(self, local_dir: Path, seed: int = 0):
        self.local_dir = local_dir
        self.state = read_state(local_dir)
        env = client_environment(self.state)
        self.env = env
        session = boto3.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        self.s3 = session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.sqs = session.client("sqs", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.ec2 = session.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.ddb = session.client("dynamodb", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.jobs_queue = self.state["outputs"]["jobs_queue_url"]
        self.done_queue = self.state["outputs"]["done_queue_url"]
        self.rng = random.Random(seed)

    def run(self, uploads: int, duplicate_fraction: float = 0.1, faults: bool = True,
            timeout_seconds: float = 1800, packages: list[Path] = (), package_share: float = 0.3,
            capacity_outage: bool = False) -> SoakReport:
        started = time.monotonic()
        report = SoakReport()
        package_uploads = int(uploads * package_share) if packages else 0
        bodies: dict[str, bytes] = {f"soak/{n:05d}.csv": _good_csv(self.rng) for n in range(uploads - package_uploads)}
        bodies.update(self.package_bodies(packages, package_uploads, report))
        bad = {**BAD_INPUTS, "bad/pickle.npy": _pickled_npy(), "bad/traversal.zip": _traversal_zip()}
        for key in bad:
            bodies[key] = bad[key]
        keys = list(bodies)
        self.rng.shuffle(keys)
        jobs: dict[str, str] = {}  # job id -> key
        fault_points = {len(keys) // 3: "instance stopped mid-burst", len(keys) // 2: "job process killed",
                        2 * len(keys) // 3: "manifest event delivered twice"} if faults else {}
        if capacity_outage:  # `make soak`: the local cloud refuses starts in one AZ for a while
            fault_points[len(keys) // 5] = CAPACITY_OUTAGE
        if packages:
            fault_points[len(keys) // 3 + 1] = "package deployed again"
        with ThreadPoolExecutor(max_workers=8) as upload_pool:
            for start in range(0, len(keys), 50):
                chunk = keys[start:start + 50]
                for key, job_id in zip(chunk, upload_pool.map(lambda k: self.put(k, bodies[k], report), chunk), strict=True):
                    jobs[job_id] = key
                for point, fault in fault_points.items():
                    if start <= point < start + 50:
                        if fault == "package deployed again":
                            self.redeploy(packages[0], report, jobs)
                        else:
                            self.inject(fault, jobs, report)
                time.sleep(0.2)
        report.uploads = len(keys)
        report.bad_inputs_tried = len(bad)
        manifests = self.wait_for_manifests(jobs, started + timeout_seconds)
        report.manifests = len(manifests)
        report.lost = sorted(set(jobs) - set(manifests))
        for job_id, manifest in manifests.items():
            key = jobs[job_id]
            name = key.split("/", 1)[0]
            if name in report.package_versions:
                version = (manifest.get("package") or {}).get("version")
                runs = report.package_runs.setdefault(name, {})
                runs[version] = runs.get(version, 0) + 1
                if version not in report.package_versions[name]:
                    report.unexpected_failures.append(f"{key}: ran version {version}, never deployed during the soak")
            if manifest["status"] == "succeeded":
                report.succeeded += 1
            else:
                report.failed += 1
                if key in bad and manifest.get("error"):
                    report.bad_inputs_failed_clearly += 1
                elif key not in bad:
                    report.unexpected_failures.append(f"{key}: {manifest.get('error')}")
                    if job_id not in report.fault_exposed and is_lost_job_error(manifest.get("error")):
                        report.lost_without_fault.append(f"{key}: {manifest.get('error')}")
        report.duplicate_runs = self.duplicate_runs(jobs)
        report.stops_under_placed_jobs = self.stops_under_placed_jobs()
        report.instance_states = self.wait_all_stopped(started + timeout_seconds + 120)
        report.wall_time_s = time.monotonic() - started
        return report

    def registry(self) -> PackageRegistry:
        return PackageRegistry(self.env["BATCHWORKER_ARTIFACTS_BUCKET"], self.s3)

    def package_bodies(self, packages: list[Path], count: int, report: SoakReport) -> dict[str, bytes]:
        """Deploy each package and spread `count` uploads over them, cycling through their sample/ files."""
        bodies: dict[str, bytes] = {}
        for n, folder in enumerate(packages):
            config = load_job_config(folder)
            report.package_versions[config.name] = [self.registry().deploy(folder).ref.version]
            samples = sorted(p for p in (folder / "sample").rglob("*") if p.is_file() and config.accepts(p.name))
            if not samples:
                raise ValueError(f"{folder}/sample has no file job {config.name!r} accepts; the soak uploads those")
            for i in range(n, count, len(packages)):
                sample = samples[i % len(samples)]
                bodies[f"{config.name}/soak-{i:05d}-{sample.name}"] = sample.read_bytes()
        return bodies

    def redeploy(self, folder: Path, report: SoakReport, jobs: dict[str, str], wait_seconds: float = 120) -> None:
        """Deploy a new version of the package (same code, one more file) once the trigger has accepted some
        of its jobs under the first version (bounded wait), so both versions run during the burst."""
        name = load_job_config(folder).name
        first = report.package_versions[name][0]
        own = [job_id for job_id, key in jobs.items() if key.startswith(f"{name}/")]
        deadline = time.monotonic() + wait_seconds
        while own and time.monotonic() < deadline and not any(self.pinned_version(j) == first for j in own):
            time.sleep(0.5)
        with tempfile.TemporaryDirectory(prefix="batchworker-soak-") as work:
            copy = Path(work) / folder.name
            shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            (copy / "SOAK-REDEPLOY").write_text(f"{time.time()}\n")
            ref = self.registry().deploy(copy).ref
        report.package_versions[ref.name].append(ref.version)
        report.faults_injected.append("package deployed again")

    def pinned_version(self, job_id: str) -> str | None:
        item = self.ddb.get_item(TableName=self.env["BATCHWORKER_JOBS_TABLE"], Key={"job_id": {"S": job_id}})
        return item.get("Item", {}).get("package_version", {}).get("S")

    def put(self, key: str, body: bytes, report: SoakReport) -> str:
        response = self.s3.put_object(Bucket=self.env["BATCHWORKER_INPUT_BUCKET"], Key=key, Body=body)
        version = response.get("VersionId") or response["ETag"]
        if self.rng.random() < 0.1:  # S3 delivers at least once: deliver this event a second time
            self.sqs.send_message(QueueUrl=self.jobs_queue, MessageBody=json.dumps(self.s3_event(
                self.env["BATCHWORKER_INPUT_BUCKET"], key, len(body), response["ETag"], response.get("VersionId"))))
            report.duplicate_deliveries += 1
        return job_id_for(self.env["BATCHWORKER_INPUT_BUCKET"], key, version)

    @staticmethod
    def s3_event(bucket: str, key: str, size: int, etag: str, version_id: str | None) -> dict:
        obj = {"key": quote_plus(key), "size": size, "eTag": etag.strip('"')}
        if version_id:
            obj["versionId"] = version_id
        return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                             "eventName": "ObjectCreated:Put",
                             "s3": {"bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj}}]}

    def inject(self, fault: str, jobs: dict[str, str], report: SoakReport) -> None:
        if fault == CAPACITY_OUTAGE:
            # An instance at work is lost (stopped) and its AZ has no capacity for a while: its jobs must be
            # restarted elsewhere or wait, not fail.
            instances = [i for r in self.ec2.describe_instances()["Reservations"] for i in r["Instances"]]
            running = [i for i in instances if i["State"]["Name"] == "running"] or instances
            if running:
                zone = running[0]["Placement"]["AvailabilityZone"]
                refuse_capacity(self.local_dir, [zone], CAPACITY_OUTAGE_SECONDS)
                if running[0]["State"]["Name"] == "running":
                    report.fault_exposed |= self.active_jobs([running[0]["InstanceId"]])
                    self.ec2.stop_instances(InstanceIds=[running[0]["InstanceId"]])
                report.faults_injected.append(f"{fault} ({zone}, {CAPACITY_OUTAGE_SECONDS:.0f}s, its instance stopped)")
        elif fault == "instance stopped mid-burst":
            running = [i["InstanceId"] for r in self.ec2.describe_instances()["Reservations"] for i in r["Instances"]
                       if i["State"]["Name"] == "running"]
            if running:
                report.fault_exposed |= self.active_jobs(running[:1])
                self.ec2.stop_instances(InstanceIds=running[:1])
                report.faults_injected.append(fault)
        elif fault == "job process killed":
            for pid in processes.processes_marked(self.state["cloud_id"]):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                # a `run` process, or the boot's prewarm process serving as the warm server
                if b"worker.cli\0run" in cmdline or b"batchworker-job\0prewarm" in cmdline:
                    report.fault_exposed |= self.active_jobs()
                    os.kill(pid, signal.SIGKILL)
                    report.faults_injected.append(fault)
                    break
        elif fault == "manifest event delivered twice":
            for job_id in list(jobs)[:5]:
                key = f"jobs/{job_id}/manifest.json"
                self.sqs.send_message(QueueUrl=self.done_queue, MessageBody=json.dumps(
                    self.s3_event(self.env["BATCHWORKER_OUTPUT_BUCKET"], key, 1, "x", None)))
            report.faults_injected.append(fault)

    def wait_for_manifests(self, jobs: dict[str, str], deadline: float) -> dict[str, dict]:
        found: dict[str, dict] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        while time.monotonic() < deadline and len(found) < len(jobs):
            for page in paginator.paginate(Bucket=self.env["BATCHWORKER_OUTPUT_BUCKET"], Prefix="jobs/"):
                for obj in page.get("Contents", []):
                    job_id = obj["Key"].split("/")[1]
                    if obj["Key"].endswith("/manifest.json") and job_id in jobs and job_id not in found:
                        body = self.s3.get_object(Bucket=self.env["BATCHWORKER_OUTPUT_BUCKET"], Key=obj["Key"])
                        manifest = json.loads(body["Body"].read())
                        if self.job_status(job_id) in ("SUCCEEDED", "FAILED"):
                            found[job_id] = manifest
            time.sleep(1)
        return found

    def active_jobs(self, instance_ids: list[str] | None = None) -> set[str]:
        """Jobs placed, dispatched or running (on these instances, or anywhere) right now."""
        found = set()
        for page in self.ddb.get_paginator("scan").paginate(TableName=self.env["BATCHWORKER_JOBS_TABLE"],
                                                            ConsistentRead=True):
            for item in page.get("Items", []):
                on = item.get("instance_id", {}).get("S")
                if item["status"]["S"] in ("QUEUED", "DISPATCHED", "RUNNING") and (
                        instance_ids is None or on in instance_ids):
                    found.add(item["job_id"]["S"])
        return found

    def job_status(self, job_id: str) -> str | None:
        item = self.ddb.get_item(TableName=self.env["BATCHWORKER_JOBS_TABLE"], Key={"job_id": {"S": job_id}}).get("Item")
        return item["status"]["S"] if item else None

    def duplicate_runs(self, jobs: dict[str, str]) -> int:
        """Launches beyond one per job that no retry asked for: each dispatch claim launches the job once."""
        count = 0
        for job_id in jobs:
            item = self.ddb.get_item(TableName=self.env["BATCHWORKER_JOBS_TABLE"], Key={"job_id": {"S": job_id}})
            item = item.get("Item", {})
            attempts = int(item.get("attempts", {}).get("N", "0"))
            retries = int(item.get("retries", {}).get("N", "0"))
            count += max(0, attempts - 1 - retries)
        return count

    def stops_under_placed_jobs(self) -> int:
        """Stops the control plane recorded while a job was placed on the instance and not finished yet."""
        jobs = []
        for page in self.ddb.get_paginator("scan").paginate(TableName=self.env["BATCHWORKER_JOBS_TABLE"]):
            jobs.extend(page.get("Items", []))
        count = 0
        for instance_id in {job["instance_id"]["S"] for job in jobs if "instance_id" in job}:
            stops = [parse_time(event["at"]["S"].split("#")[0]) for event in self._events(instance_id)
                     if event.get("state", {}).get("S") == "stop"]
            for stopped_at in stops:
                count += any(
                    job.get("instance_id", {}).get("S") == instance_id and "placed_at" in job
                    and parse_time(job["placed_at"]["S"]) < stopped_at - timedelta(seconds=PLACED_SLACK_SECONDS)
                    and (job["status"]["S"] not in ("SUCCEEDED", "FAILED") or parse_time(job["updated_at"]["S"]) > stopped_at)
                    for job in jobs
                )
        return count

    def _events(self, instance_id: str) -> list[dict]:
        items = []
        for page in self.ddb.get_paginator("query").paginate(
            TableName=self.env["BATCHWORKER_INSTANCE_EVENTS_TABLE"], KeyConditionExpression="instance_id = :i",
            ExpressionAttributeValues={":i": {"S": instance_id}},
        ):
            items.extend(page.get("Items", []))
        return items

    def wait_all_stopped(self, deadline: float) -> list[str]:
        while True:
            states = sorted(i["State"]["Name"] for r in self.ec2.describe_instances()["Reservations"]
                            for i in r["Instances"])
            if set(states) == {"stopped"} or time.monotonic() > deadline:
                return states
            time.sleep(1)
