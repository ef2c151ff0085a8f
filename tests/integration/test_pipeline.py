"""The whole loop over the local cloud: HTTP to moto, Lambda handlers in the local runtime, SSH, a torch job."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from pathlib import Path

import pytest

from batchworker.local import processes
from batchworker.models import job_id_for

pytestmark = pytest.mark.integration
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def put(cloud, key: str, body: bytes) -> str:
    response = cloud.client("s3").put_object(Bucket=cloud.input_bucket, Key=key, Body=body)
    return job_id_for(cloud.input_bucket, key, response.get("VersionId") or response.get("ETag"))


def compute_job(seconds: float) -> bytes:
    return json.dumps({"workload": "compute", "seconds": seconds}).encode()


def wait_all_stopped(cloud, timeout: float = 60) -> None:
    cloud.wait_until(lambda: set(cloud.instance_states()) == {"stopped"}, timeout, "every instance stopped")


def test_hostile_key_is_data_and_the_instance_stops(local_cloud, tmp_path):
    # GIVEN a key full of shell text, spaces, '+', '%', unicode and a leading '-'
    key = "-odd dir/$(touch PWNED) ;`touch PWNED2` 'q' \"d\" +%20 ünï.png"
    job_id = put(local_cloud, key, (SAMPLES / "digit-3.png").read_bytes())
    # WHEN the pipeline runs it
    manifest = local_cloud.wait_for_manifest(job_id)
    # THEN the job succeeded on the exact key, nothing in the key ran, and the instance stopped
    assert manifest["status"] == "succeeded", manifest
    assert manifest["input"]["key"] == key
    assert manifest["job_id"] == job_id
    text = local_cloud.client("s3").get_object(Bucket=local_cloud.output_bucket, Key=f"jobs/{job_id}/results.csv")[
        "Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["label"] for row in rows] == ["3"]
    assert not list(local_cloud.local_dir.rglob("PWNED*"))
    assert not list(Path.cwd().rglob("PWNED*"))
    wait_all_stopped(local_cloud)
    job = local_cloud.job(job_id)
    assert job["status"] == "SUCCEEDED"


def test_cli_submit_wait_downloads_results(local_cloud, tmp_path):
    result = local_cloud.cli("submit", str(SAMPLES / "digits.csv"), str(SAMPLES / "digits.zip"),
                             "--wait", "--out", str(tmp_path), "--timeout", "240")
    assert result.returncode == 0, result.stderr
    # the default job (the digits package): one results.csv row per CSV row / zip member
    results = sorted(tmp_path.glob("*/results.csv"))
    assert len(results) == 2
    labels = json.loads((SAMPLES / "labels.json").read_text())
    for path in results:
        manifest = json.loads((path.parent / "manifest.json").read_text())
        name = manifest["input"]["key"]
        got = [int(row["label"]) for row in csv.DictReader(path.open())]
        assert got == labels[name]
    status = json.loads(local_cloud.cli("status", "--json").stdout)
    assert {"instances", "jobs"} <= set(status)
    wait_all_stopped(local_cloud)


def test_bad_input_fails_with_a_clear_manifest_and_stops(local_cloud):
    job_id = put(local_cloud, "broken.csv", b"1,2,3\n")
    manifest = local_cloud.wait_for_manifest(job_id)
    assert manifest["status"] == "failed"
    assert "64" in manifest["error"]
    wait_all_stopped(local_cloud)
    assert local_cloud.job(job_id)["status"] == "FAILED"
    logs = local_cloud.cli("logs", job_id)
    assert logs.returncode == 0 and "64" in logs.stderr + logs.stdout


def test_overlapping_uploads_both_finish_then_the_instance_stops(local_cloud):
    wait_all_stopped(local_cloud)
    instance_id = local_cloud.client("ec2").describe_instances(
        Filters=[{"Name": "tag:batchworker:pool", "Values": [local_cloud.env["BATCHWORKER_POOL_TAG"]]}]
    )["Reservations"][0]["Instances"][0]["InstanceId"]
    before = _history(local_cloud, instance_id)
    # GIVEN a long job and a short one uploaded while the long one runs
    long_job = put(local_cloud, "overlap/long.json", compute_job(8))
    local_cloud.wait_until(lambda: (local_cloud.job(long_job) or {}).get("status") == "RUNNING", 90, "long job running")
    short_job = put(local_cloud, "overlap/short.json", compute_job(3))
    # WHEN one of them finishes (the short one, or the long one when the package's warm process takes its jobs
    # in turn) THEN the instance keeps running for the other
    first = local_cloud.wait_until(
        lambda: next((j for j in (short_job, long_job) if _has_manifest(local_cloud, j)), None), 120,
        "one of the two manifests")
    other = long_job if first == short_job else short_job
    assert not _has_manifest(local_cloud, other)
    assert local_cloud.instance_states() == ["running"]
    # AND when the other finishes, both succeeded and the instance stops exactly once
    assert local_cloud.wait_for_manifest(first)["status"] == "succeeded"
    assert local_cloud.wait_for_manifest(other)["status"] == "succeeded"
    wait_all_stopped(local_cloud)
    changes = [e for e in _history(local_cloud, instance_id) if e not in before]
    assert [e["state"]["S"] for e in changes] == ["start", "stop"]


def _has_manifest(cloud, job_id: str) -> bool:
    listing = cloud.client("s3").list_objects_v2(Bucket=cloud.output_bucket, Prefix=f"jobs/{job_id}/manifest.json")
    return listing.get("KeyCount", 0) > 0


def test_stopping_the_instance_kills_the_job_and_the_reaper_fails_it(local_cloud):
    wait_all_stopped(local_cloud)
    job_id = put(local_cloud, "stopme.json", compute_job(120))
    local_cloud.wait_until(lambda: (local_cloud.job(job_id) or {}).get("status") == "RUNNING", 90, "job running")
    local_cloud.wait_until(lambda: _job_processes(local_cloud), 30, "the job's process on the instance")
    # WHEN the instance is stopped under the job (an operator, a spot interruption)
    instance_id = local_cloud.job(job_id)["instance_id"]
    local_cloud.client("ec2").stop_instances(InstanceIds=[instance_id])
    # THEN the job's process dies with the instance, as on EC2 ...
    local_cloud.wait_until(lambda: not _job_processes(local_cloud), 30, "the job's process to die")
    # ... its lease runs out, and the reaper fails it with a manifest the client can read
    manifest = local_cloud.wait_for_manifest(job_id, timeout=60)
    assert manifest["status"] == "failed" and "stopped reporting progress" in manifest["error"]
    assert local_cloud.job(job_id)["status"] == "FAILED"
    assert local_cloud.instance_states() == ["stopped"]


def test_a_killed_job_process_is_failed_and_its_instance_stopped(local_cloud):
    wait_all_stopped(local_cloud)
    job_id = put(local_cloud, "killme.json", compute_job(120))
    pid = local_cloud.wait_until(lambda: _job_pid(local_cloud, job_id), 90, "the job's process on the instance")
    os.kill(pid, signal.SIGKILL)  # WHEN the job process dies without a word (OOM killer, segfault)
    # THEN the reaper fails it once the lease expires, and the instance stops
    manifest = local_cloud.wait_for_manifest(job_id, timeout=60)
    assert manifest["status"] == "failed" and "stopped reporting progress" in manifest["error"]
    wait_all_stopped(local_cloud)


def test_a_job_past_its_maximum_runtime_is_failed_and_its_instance_stopped(local_cloud):
    wait_all_stopped(local_cloud)
    # GIVEN a job that would run 90 s on a deployment that caps jobs at 40 s
    job_id = put(local_cloud, "hang.json", compute_job(90))
    manifest = local_cloud.wait_for_manifest(job_id, timeout=120)
    # THEN the reaper fails it with the reason, the instance stops, and the job dies with it
    assert manifest["status"] == "failed" and "maximum runtime" in manifest["error"]
    wait_all_stopped(local_cloud)
    local_cloud.wait_until(lambda: not _job_processes(local_cloud), 30, "the job's process to die")


def _job_pid(cloud, job_id: str) -> int | None:
    """The process running the job (a `run`, or the warm server that took it), as its run.pid names it."""
    for path in cloud.local_dir.glob(f"instances/*/jobs/{job_id}/run.pid"):
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            continue
        if pid in _job_processes(cloud):
            return pid
    return None


def _job_processes(cloud) -> list[int]:
    state = json.loads((cloud.local_dir / "state.json").read_text())
    pids = []
    for pid in processes.processes_marked(state["cloud_id"]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # A `run`, or the boot's warm server (`batchworker-job prewarm`), which runs the first batch of a start
        if (b"worker.cli" in cmdline and b"run" in cmdline) or b"prewarm" in cmdline:
            pids.append(pid)
    return pids


def _history(cloud, instance_id: str) -> list[dict]:
    return [item for item in cloud.client("dynamodb").query(
        TableName=cloud.env["BATCHWORKER_INSTANCE_EVENTS_TABLE"], KeyConditionExpression="instance_id = :i",
        ExpressionAttributeValues={":i": {"S": instance_id}},
    )["Items"] if "state" in item]
