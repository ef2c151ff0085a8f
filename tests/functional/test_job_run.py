"""The instance job end to end against moto: in-process runs, and `batchworker-job launch` as a subprocess.

Every job runs the default job package (examples/jobs/digits, archived as `job deploy` and Terraform ship it),
through the same runner as any package: results.csv, errors.jsonl, the manifest's package and environment.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import torch
from botocore.config import Config
from moto import mock_aws
from moto.server import ThreadedMotoServer

from batchworker.jobpkg.archive import build_archive
from worker.deadman import read_deadman, running_job_pids
from worker.errors import ExitCode
from worker.lease import status_shard
from worker.runner import run_job
from worker.spec import parse_spec
from worker.storage import Storage

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
MODEL_PATH = REPO / "build" / "model" / "digits-cnn.pt"
DIGITS_PACKAGE = REPO / "examples" / "jobs" / "digits"
INPUT, OUTPUT, ARTIFACTS = "job-input", "job-output", "job-artifacts"
PACKAGES_URI = f"s3://{ARTIFACTS}/job-packages/"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def digits_archive(tmp_path_factory) -> tuple[str, bytes]:
    """The digits package with the real CNN, archived as `job deploy` does: (sha256 version, archive bytes).
    scripts/train_model.py skips training when build/model is up to date."""
    trainer = [sys.executable, str(REPO / "scripts" / "train_model.py")]
    subprocess.run(trainer, check=True, capture_output=True)
    work = tmp_path_factory.mktemp("digits-package")
    package = work / "digits"
    shutil.copytree(DIGITS_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    (package / "weights").mkdir()
    shutil.copyfile(MODEL_PATH, package / "weights" / "digits-cnn.pt")
    archive = build_archive(package, work / "out")
    return archive.sha256, archive.path.read_bytes()


def put_package(s3, digits_archive: tuple[str, bytes]) -> None:
    version, body = digits_archive
    s3.put_object(Bucket=ARTIFACTS, Key=f"job-packages/digits/{version}.tar.gz", Body=body)
    # the default job's pointer, as Terraform ships it (prewarm reads it)
    s3.put_object(Bucket=ARTIFACTS, Key="job-packages/digits/bundled.json",
                  Body=json.dumps({"name": "digits", "version": version}).encode())


@pytest.fixture(scope="session")
def package_ref(digits_archive) -> dict:
    version = digits_archive[0]
    return {"name": "digits", "version": version, "uri": f"{PACKAGES_URI}digits/{version}.tar.gz"}


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("BATCHWORKER_INSTANCE_ID", raising=False)


@pytest.fixture
def s3(aws_env, digits_archive, package_ref):
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        for bucket in (INPUT, OUTPUT, ARTIFACTS):
            client.create_bucket(Bucket=bucket)
        put_package(client, digits_archive)
        yield client


_PACKAGE: dict = {}  # make_spec is a plain function (tests build specs in loops): the session's package ref


@pytest.fixture(autouse=True)
def _package_for_specs(package_ref):
    _PACKAGE.update(package_ref)


def make_spec(job_id: str, key: str, version_id: str | None = None, **optional):
    return parse_spec(
        json.dumps(
            {
                "job_id": job_id,
                "input": {"bucket": INPUT, "key": key, "version_id": version_id},
                "output": {"bucket": OUTPUT, "prefix": f"jobs/{job_id}/"},
                "package": dict(_PACKAGE),
                "instance_id": "i-0123456789abcdef0",
                **optional,
            }
        )
    )


def job_id(n: int) -> str:
    return f"j-{n:016x}"


def read_json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=OUTPUT, Key=key)["Body"].read())


def read_results(s3, job: str) -> list[dict]:
    text = s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job}/results.csv")["Body"].read().decode()
    return list(csv.DictReader(io.StringIO(text)))


def output_keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=OUTPUT).get("Contents", []))


def test_the_manifest_names_the_version_it_read_when_the_event_did_not(s3, tmp_path):
    # GIVEN a versioned input bucket and a spec without the object's version (an event that did not carry it)
    s3.put_bucket_versioning(Bucket=INPUT, VersioningConfiguration={"Status": "Enabled"})
    version = s3.put_object(Bucket=INPUT, Key="v/digit.png", Body=(SAMPLES / "digit-3.png").read_bytes())["VersionId"]
    # WHEN the job runs
    code = run_job(make_spec(job_id(90), "v/digit.png"), tmp_path / "jobs")
    # THEN its manifest names the version it downloaded
    manifest = read_json(s3, f"jobs/{job_id(90)}/manifest.json")
    assert code == ExitCode.SUCCEEDED, manifest["error"]
    assert manifest["input"] == {"bucket": INPUT, "key": "v/digit.png", "version_id": version}

def test_bundled_samples_are_predicted(s3, tmp_path):
    # GIVEN every bundled sample uploaded under an awkward key
    labels = json.loads((SAMPLES / "labels.json").read_text())
    correct = total = 0
    for n, (name, truth) in enumerate(labels.items(), start=1):
        key = f"uploads/../we ird;$(x)/{name}"
        s3.put_object(Bucket=INPUT, Key=key, Body=(SAMPLES / name).read_bytes())
        job = job_id(n)
        # WHEN the job runs
        code = run_job(make_spec(job, key), tmp_path / "jobs")
        # THEN it succeeds with one row per image, zip member, CSV row or array row, and a manifest uploaded last
        manifest = read_json(s3, f"jobs/{job}/manifest.json")
        assert code == ExitCode.SUCCEEDED, manifest["error"]
        assert manifest["status"] == "succeeded" and manifest["error"] is None
        assert manifest["results_rows"] == len(truth)
        prefix = f"jobs/{job}/"
        assert manifest["outputs"] == [prefix + "results.csv", prefix + "errors.jsonl", prefix + "job.log"]
        assert manifest["input"] == {"bucket": INPUT, "key": key, "version_id": None}
        assert manifest["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        assert manifest["package"] == _PACKAGE and manifest["instance_id"] == "i-0123456789abcdef0"
        assert {"started_at", "finished_at", "slot_wait_s", "download_s", "model_load_s", "inference_s",
                "upload_s", "total_s"} <= set(manifest["timings"])
        rows = read_results(s3, job)
        assert rows[0]["item"] and {"label", "confidence", "prob_0", "prob_9"} <= set(rows[0])
        assert list(rows[0])[0] == "item"
        assert len(rows) == len(truth)
        correct += sum(int(row["label"]) == label for row, label in zip(rows, truth, strict=True))
        total += len(truth)
        if name == "digits.zip":
            assert [row["item"] for row in rows] == [f"digits/{i:02d}.png" for i in range(1, 5)]
        if name == "digits.csv":
            assert [(row["item"], row["row"]) for row in rows] == [("digits.csv", str(i)) for i in range(1, 6)]
        if name.endswith(".png"):
            assert rows[0]["item"] == name
    assert correct / total >= 0.9
    # the package was downloaded and unpacked once; the later jobs found it in the instance's cache
    assert len([p for p in (tmp_path / "jobs" / ".packages").iterdir() if p.is_dir()]) == 1
    log = s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job_id(1)}/job.log")["Body"].read().decode()
    events = [json.loads(line)["event"] for line in log.splitlines()]
    assert events[0] == "job started" and "package ready" in events
    assert events[-1] == "uploading job.log and manifest"


def test_corrupt_input_gives_failed_manifest_and_exit_2(s3, tmp_path):
    s3.put_object(Bucket=INPUT, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    code = run_job(make_spec(job_id(1), "in/broken.png"), tmp_path)
    manifest = read_json(s3, f"jobs/{job_id(1)}/manifest.json")
    assert code == ExitCode.FAILED
    assert manifest["status"] == "failed" and (manifest["items_succeeded"], manifest["items_failed"]) == (0, 1)
    assert "broken.png is not a readable PNG image (corrupt or truncated" in manifest["error"]
    prefix = f"jobs/{job_id(1)}/"
    assert manifest["outputs"] == [prefix + "results.csv", prefix + "errors.jsonl", prefix + "job.log"]
    (error,) = [json.loads(line) for line in
                s3.get_object(Bucket=OUTPUT, Key=prefix + "errors.jsonl")["Body"].read().decode().splitlines()]
    assert error["item"] == "broken.png" and error["type"] == "InputError"
    assert json.loads((tmp_path / job_id(1) / "manifest.json").read_text()) == manifest


def test_csv_with_a_short_row_names_it_in_the_manifest(s3, tmp_path):
    rows = ["0," * 63 + "0", "0," * 63 + "0", "0," * 62 + "0"]
    s3.put_object(Bucket=INPUT, Key="input.csv", Body="\n".join(rows).encode())
    assert run_job(make_spec(job_id(2), "input.csv"), tmp_path) == ExitCode.FAILED
    error = read_json(s3, f"jobs/{job_id(2)}/manifest.json")["error"]
    assert "input.csv row 3 has 63 values; expected 64 pixel values on the 0-16 scale" in error


def test_missing_input_and_unsupported_type_are_permanent(s3, tmp_path):
    assert run_job(make_spec(job_id(3), "gone.png"), tmp_path) == ExitCode.FAILED
    assert "does not exist" in read_json(s3, f"jobs/{job_id(3)}/manifest.json")["error"]
    s3.put_object(Bucket=INPUT, Key="notes.txt", Body=b"hello")
    assert run_job(make_spec(job_id(4), "notes.txt"), tmp_path) == ExitCode.FAILED
    assert "is not a file type this job accepts" in read_json(s3, f"jobs/{job_id(4)}/manifest.json")["error"]


def test_unexpected_error_still_writes_an_honest_failed_manifest(s3, tmp_path, monkeypatch):
    def broken_writer(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("worker.package_run._upload_results", broken_writer)
    s3.put_object(Bucket=INPUT, Key="digits.csv", Body=(SAMPLES / "digits.csv").read_bytes())
    assert run_job(make_spec(job_id(11), "digits.csv"), tmp_path) == ExitCode.FAILED
    manifest = read_json(s3, f"jobs/{job_id(11)}/manifest.json")
    assert manifest["error"].startswith("internal error in the job (RuntimeError); see jobs/")
    assert manifest["outputs"] == [f"jobs/{job_id(11)}/job.log"]


def test_unreachable_s3_is_transient_and_the_manifest_is_kept_locally(aws_env, tmp_path):
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    code = run_job(make_spec(job_id(8), "digit.png"), tmp_path, storage=Storage(client))
    assert code == ExitCode.TRANSIENT
    manifest = json.loads((tmp_path / job_id(8) / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "retry later" in manifest["error"]


@pytest.fixture
def moto_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
    yield url  # the reset: moto's backends are per Python process, shared by every server it starts
    server.stop()


def test_launch_detaches_and_the_job_uploads_its_manifest(moto_server, digits_archive, tmp_path):
    # GIVEN a moto server with the digits package and an input
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    for bucket in (INPUT, OUTPUT, ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="batch/digits.npy", Body=(SAMPLES / "digits.npy").read_bytes())
    job = job_id(9)
    spec = json.dumps(make_spec(job, "batch/digits.npy").to_json())
    stale = tmp_path / job_id(10)  # a job finished long ago on this instance: launch prunes it
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    for path in (stale / "manifest.json", stale):
        os.utime(path, (time.time() - 8 * 24 * 3600,) * 2)
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
    command = [str(Path(sys.executable).with_name("batchworker-job")), "launch"]
    # WHEN launch gets the spec on stdin
    launched = subprocess.run(command, input=spec.encode(), env=env, capture_output=True, timeout=30)
    # THEN it prints one JSON line with the pid and returns at once
    assert launched.returncode == 0, launched.stderr.decode()
    reply = json.loads(launched.stdout)
    assert reply["job_id"] == job and isinstance(reply["pid"], int)
    assert not stale.exists()
    command_line = Path(f"/proc/{reply['pid']}/cmdline").read_bytes().decode(errors="replace")
    assert "batch/digits.npy" not in command_line
    # AND launching the same job again while it runs starts nothing new
    again = subprocess.run(command, input=spec.encode(), env=env, capture_output=True, timeout=30)
    assert json.loads(again.stdout) == {"job_id": job, "pid": reply["pid"], "already_running": True}
    # AND the detached job uploads its manifest
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=OUTPUT).get("Contents", [])]
        if f"jobs/{job}/manifest.json" in keys:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no manifest after 60 s; run.log:\n{(tmp_path / job / 'run.log').read_text()}")
    manifest = json.loads(s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job}/manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded", manifest["error"]
    assert manifest["results_rows"] == 6


def test_launch_rejects_a_bad_spec(tmp_path):
    env = {**os.environ, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
    command = [str(Path(sys.executable).with_name("batchworker-job")), "launch"]
    result = subprocess.run(command, input=b'{"job_id": "../../x"}', env=env, capture_output=True, timeout=30)
    assert result.returncode == 2 and result.stdout == b""
    assert "job_id must match" in json.loads(result.stderr)["error"]
    assert list(tmp_path.iterdir()) == []
    # AND a batch with one bad spec starts none of them
    good = make_spec(job_id(12), "a.png").to_json()
    bad = {**make_spec(job_id(13), "b.png").to_json(), "max_concurrent_jobs": 0}
    batch = json.dumps({"jobs": [good, bad]}).encode()
    result = subprocess.run(command, input=batch, env=env, capture_output=True, timeout=30)
    assert result.returncode == 2 and result.stdout == b""
    error = json.loads(result.stderr)["error"]
    assert error.startswith(f"jobs[1] (job_id '{job_id(13)}'): max_concurrent_jobs must be")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_gives_a_transient_failed_manifest(moto_server, digits_archive, tmp_path):
    # GIVEN a job running in the foreground against a moto server
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    for bucket in (INPUT, OUTPUT, ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="digits.csv", Body=(SAMPLES / "digits.csv").read_bytes())
    job = job_id(10)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(make_spec(job, "digits.csv").to_json()))
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", str(spec_path)], env=env, stderr=subprocess.DEVNULL
    )
    log = tmp_path / job / "job.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and "job started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # WHEN it is terminated (instance stopping) while it sets its package up
    process.terminate()
    # THEN it still uploads a failed manifest and exits 75
    assert process.wait(timeout=60) == ExitCode.TRANSIENT
    manifest = json.loads(s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job}/manifest.json")["Body"].read())
    assert manifest["status"] == "failed" and "interrupted (SIGTERM)" in manifest["error"]


# --- lease heartbeat, compute workload, batches, slots ------------------------------------------------

TABLE = "job-jobs"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COMPUTE_HINT = (
    'a .json item must be a compute workload, exactly {"workload": "compute" or "hold", "seconds": S} '
    "with 0 < S <= 3600"
)


def create_jobs_table(ddb, job_statuses: dict[str, str]) -> None:
    ddb.create_table(
        TableName=TABLE, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
    )
    for job, status in job_statuses.items():
        ddb.put_item(TableName=TABLE, Item={"job_id": {"S": job}, "status": {"S": status}})


def job_item(ddb, job: str) -> dict[str, str]:
    item = ddb.get_item(TableName=TABLE, Key={"job_id": {"S": job}}, ConsistentRead=True)["Item"]
    return {name: next(iter(value.values())) for name, value in item.items()}  # S, or N (items_done/_total)


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class CountingClient:
    """The DynamoDB client the heartbeat gets, counting its UpdateItem calls."""

    def __init__(self, client) -> None:
        self.client = client
        self.updates = 0

    def update_item(self, **kwargs):
        self.updates += 1
        return self.client.update_item(**kwargs)


def compute_file(seconds, workload="compute") -> bytes:
    return json.dumps({"workload": workload, "seconds": seconds}).encode()


def test_lease_heartbeat_marks_the_job_running_and_renews_it(s3, tmp_path, monkeypatch):
    # GIVEN a DISPATCHED job whose 2-second compute workload holds a 3-second lease (renewed every second)
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    create_jobs_table(ddb, {job_id(20): "DISPATCHED"})
    counting = CountingClient(ddb)
    monkeypatch.setattr("worker.lease.make_client", lambda: counting)
    s3.put_object(Bucket=INPUT, Key="load/two.json", Body=compute_file(2))
    spec = make_spec(job_id(20), "load/two.json", lease={"table": TABLE, "seconds": 3})
    # WHEN it runs
    assert run_job(spec, tmp_path) == ExitCode.SUCCEEDED
    # THEN the item is RUNNING, renewed more than once, with a lease at least 3 s past its start
    item = job_item(ddb, job_id(20))
    assert item["status"] == "RUNNING" and item["status_shard"] == status_shard(job_id(20), "RUNNING")
    assert all(ISO_MS.match(item[name]) for name in ("lease_expires_at", "updated_at", "running_since"))
    assert parse_iso(item["lease_expires_at"]) - parse_iso(item["running_since"]) >= dt.timedelta(seconds=3)
    # AND the start wrote updated_at; the renewals after it moved only the lease (which the status index does
    # not carry: a renewal never writes to the index)
    assert item["updated_at"] == item["running_since"]
    manifest = read_json(s3, f"jobs/{job_id(20)}/manifest.json")
    assert parse_iso(item["lease_expires_at"]) > parse_iso(manifest["timings"]["finished_at"])
    assert counting.updates >= 2
    log = (tmp_path / job_id(20) / "job.log").read_text()
    assert "lease taken" in log and "the job is RUNNING in the jobs table" in log


def test_a_job_the_control_plane_failed_stops_its_heartbeat_but_finishes(s3, tmp_path, monkeypatch):
    # GIVEN a job already FAILED in the table (the watchdog gave up on it)
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    create_jobs_table(ddb, {job_id(21): "FAILED"})
    counting = CountingClient(ddb)
    monkeypatch.setattr("worker.lease.make_client", lambda: counting)
    s3.put_object(Bucket=INPUT, Key="load/one.json", Body=compute_file(1))
    spec = make_spec(job_id(21), "load/one.json", lease={"table": TABLE, "seconds": 1.5})
    # WHEN it runs with a lease renewed every 0.5 s
    assert run_job(spec, tmp_path) == ExitCode.SUCCEEDED
    # THEN the first renewal is refused, the item stays FAILED, and no renewal follows
    assert job_item(ddb, job_id(21)) == {"job_id": job_id(21), "status": "FAILED"}
    assert counting.updates == 1
    log = (tmp_path / job_id(21) / "job.log").read_text()
    assert "lease heartbeat stopped" in log
    assert read_json(s3, f"jobs/{job_id(21)}/manifest.json")["status"] == "succeeded"


def test_compute_workload_runs_for_its_seconds(s3, tmp_path):
    s3.put_object(Bucket=INPUT, Key="load/one.json", Body=compute_file(1))
    assert run_job(make_spec(job_id(22), "load/one.json", idle_shutdown_seconds=120), tmp_path) == 0
    manifest = read_json(s3, f"jobs/{job_id(22)}/manifest.json")
    assert manifest["status"] == "succeeded", manifest["error"]
    assert manifest["timings"]["inference_s"] >= 1.0  # the handler's process() call
    rows = read_results(s3, job_id(22))
    assert len(rows) == 1 and rows[0]["item"] == "one.json" and rows[0]["workload"] == "compute"
    assert int(rows[0]["forward_items"]) > 0 and int(rows[0]["forward_items"]) % 64 == 0
    assert 0 <= int(rows[0]["label"]) <= 9 and 0 < float(rows[0]["confidence"]) <= 1
    # AND the job pushed the dead-man timer at its end
    assert read_deadman(tmp_path).expires_at == pytest.approx(time.time() + 120, abs=10)


def test_hold_workload_keeps_its_slot_for_its_seconds(s3, tmp_path):
    s3.put_object(Bucket=INPUT, Key="load/hold.json", Body=compute_file(1.5, "hold"))
    assert run_job(make_spec(job_id(24), "load/hold.json"), tmp_path) == 0
    manifest = read_json(s3, f"jobs/{job_id(24)}/manifest.json")
    assert manifest["status"] == "succeeded", manifest["error"]
    assert 1.5 <= manifest["timings"]["inference_s"] < 3.0
    (row,) = read_results(s3, job_id(24))
    assert (row["item"], row["workload"], row["forward_items"]) == ("hold.json", "hold", "64")  # one forward pass


@pytest.mark.parametrize(
    "body",
    [
        compute_file(0),
        compute_file(5, "sleep"),
        compute_file(3601),
        compute_file("5"),
        b'{"workload": "train", "seconds": 5}',
        b'{"workload": "compute", "seconds": 5, "gpus": 2}',
        b"[1, 2]",
        b"not json",
    ],
)
def test_a_bad_compute_file_fails_and_says_what_one_looks_like(s3, tmp_path, body):
    s3.put_object(Bucket=INPUT, Key="load/bad.json", Body=body)
    assert run_job(make_spec(job_id(23), "load/bad.json"), tmp_path) == ExitCode.FAILED
    manifest = read_json(s3, f"jobs/{job_id(23)}/manifest.json")
    assert manifest["status"] == "failed" and "first: bad.json: InputError: bad.json is " in manifest["error"]
    assert COMPUTE_HINT in manifest["error"]


def server_clients(moto_server: str):
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **credentials)
    ddb = boto3.client("dynamodb", endpoint_url=moto_server, region_name="us-east-1", **credentials)
    for bucket in (INPUT, OUTPUT, ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    return s3, ddb


def launch_job(moto_server: str, job_root: Path, request: dict) -> dict:
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(job_root)}
    command = [str(Path(sys.executable).with_name("batchworker-job")), "launch"]
    stdin = json.dumps(request).encode()
    launched = subprocess.run(command, input=stdin, env=env, capture_output=True, timeout=30)
    assert launched.returncode == 0, launched.stderr.decode()
    return json.loads(launched.stdout)


def wait_for_manifests(s3, jobs: list[str], job_root: Path, timeout: float = 90) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    wanted = {f"jobs/{job}/manifest.json": job for job in jobs}
    while time.monotonic() < deadline:
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=OUTPUT).get("Contents", [])}
        if set(wanted) <= keys:
            return {job: json.loads(s3.get_object(Bucket=OUTPUT, Key=key)["Body"].read())
                    for key, job in wanted.items()}
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in job_root.glob("*/run.log"))
    pytest.fail(f"no manifests for all of {jobs} after {timeout} s; run.log:\n{logs}")


def test_launch_runs_a_batch_in_one_process(moto_server, digits_archive, tmp_path):
    # GIVEN four DISPATCHED jobs, the first already running on its own (a 4-second compute workload)
    s3, ddb = server_clients(moto_server)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="overlap/long.json", Body=compute_file(4))
    s3.put_object(Bucket=INPUT, Key="batch/digits.npy", Body=(SAMPLES / "digits.npy").read_bytes())
    s3.put_object(Bucket=INPUT, Key="batch/digits.csv", Body=(SAMPLES / "digits.csv").read_bytes())
    s3.put_object(Bucket=INPUT, Key="batch/digit-3.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    jobs = [job_id(n) for n in range(30, 34)]
    create_jobs_table(ddb, dict.fromkeys(jobs, "DISPATCHED"))
    lease = {"table": TABLE, "seconds": 30}
    keys = ["overlap/long.json", "batch/digits.npy", "batch/digits.csv", "batch/digit-3.png"]
    specs = [make_spec(job, key, lease=lease).to_json() for job, key in zip(jobs, keys, strict=True)]
    alone = launch_job(moto_server, tmp_path, specs[0])
    # WHEN all four are launched as one batch
    reply = launch_job(moto_server, tmp_path, {"jobs": specs})
    # THEN the running one is reported, not started again, and the other three wait in its process, whose
    # handler has their package warm (one process per package version: setup() does not run again elsewhere)
    assert reply["jobs"][0] == {"job_id": jobs[0], "pid": alone["pid"], "already_running": True}
    assert [entry["job_id"] for entry in reply["jobs"][1:]] == jobs[1:]
    pids = {entry["pid"] for entry in reply["jobs"][1:]}
    assert pids == {alone["pid"]} and "already_running" not in reply["jobs"][1]
    batch_file = tmp_path / ".batches" / f"{jobs[1]}.json"
    assert json.loads(batch_file.read_text()) == {"jobs": jobs[1:]}
    # AND every job writes its own manifest
    manifests = wait_for_manifests(s3, jobs, tmp_path)
    assert {job: m["status"] for job, m in manifests.items()} == dict.fromkeys(jobs, "succeeded")
    assert [manifests[job]["results_rows"] for job in jobs[1:]] == [6, 5, 1]
    # AND the handler was set up once, for the first job, and every job's lease was renewed
    events = [
        [json.loads(line)["event"] for line in (tmp_path / job / "job.log").read_text().splitlines()]
        for job in jobs
    ]
    assert "handler setup() done" in events[0]
    assert all("handler warm: setup() already done" in later for later in events[1:])
    for job in jobs:
        item = job_item(ddb, job)
        assert item["status"] == "RUNNING" and ISO_MS.match(item["lease_expires_at"])


def test_one_slot_keeps_two_runs_apart(moto_server, digits_archive, tmp_path):
    # GIVEN two DISPATCHED compute jobs launched separately on an instance that allows one job at a time
    s3, ddb = server_clients(moto_server)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="load/two.json", Body=compute_file(2))
    jobs = [job_id(40), job_id(41)]
    create_jobs_table(ddb, dict.fromkeys(jobs, "DISPATCHED"))
    lease = {"table": TABLE, "seconds": 3}
    replies = [
        launch_job(moto_server, tmp_path, make_spec(job, "load/two.json", max_concurrent_jobs=1, lease=lease).to_json())
        for job in jobs
    ]
    # THEN the second waits in the first one's process (its package's handler warm), not in a new one
    assert replies[0]["pid"] == replies[1]["pid"]
    # AND their device time does not overlap; the wait counts as the second's slot wait
    manifests = wait_for_manifests(s3, jobs, tmp_path)
    spans = sorted(
        (
            parse_iso(m["timings"]["started_at"]) + dt.timedelta(seconds=m["timings"]["slot_wait_s"]),
            parse_iso(m["timings"]["finished_at"]),
            m["timings"]["slot_wait_s"],
        )
        for m in manifests.values()
    )
    (_, first_end, _), (second_start, _, second_wait) = spans
    assert second_start >= first_end - dt.timedelta(milliseconds=10)
    assert second_wait >= 1.0
    assert "waited in the warm server's queue" in (tmp_path / jobs[1] / "job.log").read_text()
    # AND the waiting job's runtime counts from its own start, not from its wait (waiting is not running)
    second_running_since = parse_iso(job_item(ddb, jobs[1])["running_since"])
    assert second_running_since >= parse_iso(manifests[jobs[0]]["timings"]["finished_at"]) - dt.timedelta(milliseconds=10)
    os.kill(replies[0]["pid"], signal.SIGTERM)  # the idle warm server


# --- the warm server (worker/server.py) ---------------------------------------------------------------


@pytest.fixture
def job_processes():
    """Pids of the detached `run` processes a test started; killed (if still jobs) when it ends."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            if b"worker.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def timed_launch(moto_server: str, job_root: Path, spec, job_processes: list[int]) -> tuple[dict, float]:
    """Launch one spec and wait for its manifest: (launch reply, seconds from launch to manifest)."""
    started = time.monotonic()
    reply = launch_job(moto_server, job_root, spec.to_json())
    job_processes.append(reply["pid"])
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    key = f"jobs/{spec.job_id}/manifest.json"
    deadline = started + 90
    while time.monotonic() < deadline:
        try:
            manifest = json.loads(s3.get_object(Bucket=OUTPUT, Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            time.sleep(0.02)
            continue
        return {**reply, "manifest": manifest}, time.monotonic() - started
    logs = "\n".join(p.read_text() for p in job_root.glob("*/run.log"))
    pytest.fail(f"no manifest for {spec.job_id} after 90 s; run.log:\n{logs}")


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s")
        time.sleep(0.05)


def is_alive(pid: int) -> bool:
    try:
        return b"worker.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def offer(socket_path: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path))
        sock.sendall(line)
        return json.loads(sock.makefile("rb").readline())


def warm_spec(n: int, linger: float):
    return make_spec(job_id(n), "warm/digit-3.png", server_linger_seconds=linger)


def test_a_warm_server_takes_the_next_batch(moto_server, digits_archive, tmp_path, job_processes):
    # GIVEN a first job launched on a cold instance, its process lingering 30 s after it
    s3, _ = server_clients(moto_server)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="warm/digit-3.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    first, cold = timed_launch(moto_server, tmp_path, warm_spec(50, 30), job_processes)
    server_socket = tmp_path / ".server.sock"
    wait_until(server_socket.exists, 10, "the warm server's socket")
    assert stat.S_IMODE(server_socket.stat().st_mode) == 0o600
    # AND once the job is done (run.done comes just after the manifest), the idle server does not keep the
    # instance up
    wait_until(lambda: running_job_pids(tmp_path) == [], 10, "the job's run.done")
    assert is_alive(first["pid"])
    # WHEN a second job is launched
    second, warm = timed_launch(moto_server, tmp_path, warm_spec(51, 30), job_processes)
    # THEN the same process ran it, with the package's handler still warm (setup() not run again), faster
    assert second["job_id"] == job_id(51) and second["pid"] == first["pid"]
    assert first["manifest"]["status"] == second["manifest"]["status"] == "succeeded"
    cold_t, warm_t = first["manifest"]["timings"], second["manifest"]["timings"]
    assert warm_t["model_load_s"] < 0.5 and warm_t["model_load_s"] < cold_t["model_load_s"]
    assert warm_t["total_s"] < cold_t["total_s"]
    assert warm < cold
    print(f"launch->manifest: cold {cold:.2f} s, warm {warm:.2f} s")
    assert "handler warm: setup() already done" in (tmp_path / job_id(51) / "job.log").read_text()
    assert json.loads((tmp_path / ".batches" / f"{job_id(51)}.json").read_text()) == {"jobs": [job_id(51)]}
    wait_until(server_socket.exists, 10, "the warm server listening again")
    # AND a message that is not an offered batch file of this job root is refused
    batches = tmp_path / ".batches"
    (batches / f"{job_id(52)}.json").write_text(json.dumps({"jobs": [job_id(52)]}))  # no offer token
    (batches / "evil.json").write_text("{}")
    bad_lines = [
        b"/etc/passwd\n",
        f"{batches}/../.batches/evil.json\n".encode(),
        f"{batches}/{job_id(53)}.json\n".encode(),  # no such file
        f"{batches}/{job_id(52)}.json\n".encode(),  # not offered
        f"{batches / job_id(51)}.json; touch {tmp_path}/pwned\n".encode(),
        b"\xff\xfe\n",
        f"{batches}/{job_id(52)}.json".encode() + b"\nmore\n",
    ]
    for line in bad_lines:
        assert offer(server_socket, line)["accepted"] is False, line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / job_id(52) / "run.log").exists()
    assert is_alive(first["pid"])
    # AND SIGTERM ends the idle server at once, removing its socket
    os.kill(first["pid"], signal.SIGTERM)
    wait_until(lambda: not is_alive(first["pid"]), 10, "the server's exit")
    assert not server_socket.exists()


def test_linger_zero_keeps_one_process_per_batch_and_a_server_exits_after_linger(
    moto_server, digits_archive, tmp_path, job_processes
):
    s3, _ = server_clients(moto_server)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="warm/digit-3.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    # GIVEN a job that asks for no warm server
    first, _ = timed_launch(moto_server, tmp_path, warm_spec(60, 0), job_processes)
    # THEN its process exits after the job and never listens
    wait_until(lambda: not is_alive(first["pid"]), 10, "the run's exit")
    assert not (tmp_path / ".server.sock").exists()
    # WHEN the next job lingers 1 s
    second, _ = timed_launch(moto_server, tmp_path, warm_spec(61, 1), job_processes)
    # THEN a new process ran it, and it exits about a second after its batch
    assert second["pid"] != first["pid"] and second["manifest"]["status"] == "succeeded"
    wait_until(lambda: not is_alive(second["pid"]), 10, "the warm server's exit after linger")
    assert not (tmp_path / ".server.sock").exists()
    # AND a third job starts a fresh process again
    third, _ = timed_launch(moto_server, tmp_path, warm_spec(62, 0), job_processes)
    assert third["pid"] not in (first["pid"], second["pid"])
    assert third["manifest"]["status"] == "succeeded"


# --- prewarm at boot (worker/prewarm.py) ------------------------------------------------------------


@pytest.fixture
def prewarm(moto_server, tmp_path):
    """Start `batchworker-job prewarm` on a job root, as the instance's boot does; killed at the end."""
    started: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"prewarm-{len(started)}.log"
        env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("batchworker-job")), "prewarm", "--packages-uri", PACKAGES_URI,
                 "--default-job", "digits",
                 "--linger-seconds", "30"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process, log

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_the_first_batch_runs_in_the_prewarmed_server(moto_server, digits_archive, tmp_path, prewarm, job_processes):
    s3, _ = server_clients(moto_server)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="warm/digit-3.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    # GIVEN an instance that booted: prewarm set up the default job's handler before any job came
    process, log = prewarm()
    wait_until(lambda: b"warm after" in log.read_bytes() or process.poll() is not None, 60, "prewarm ready")
    assert process.poll() is None, log.read_text()
    # WHEN the first job of the cold start is launched
    reply, _ = timed_launch(moto_server, tmp_path, warm_spec(60, 30), job_processes)
    # THEN the prewarmed process ran it, the handler's setup() already done
    assert reply["pid"] == process.pid
    assert reply["manifest"]["status"] == "succeeded"
    assert reply["manifest"]["timings"]["model_load_s"] < 0.5
    assert "handler warm: setup() already done" in (tmp_path / job_id(60) / "job.log").read_text()


def test_a_batch_that_arrives_while_prewarm_starts_runs_once(
        moto_server, digits_archive, tmp_path, prewarm, job_processes):
    s3, _ = server_clients(moto_server)
    put_package(s3, digits_archive)
    s3.put_object(Bucket=INPUT, Key="warm/digit-3.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    # GIVEN prewarm just started (still importing), WHEN a job is launched at once
    process, log = prewarm()
    reply, _ = timed_launch(moto_server, tmp_path, warm_spec(61, 30), job_processes)
    # THEN it ran exactly once (in prewarm's server, or in a `run` of its own if it came first)
    assert reply["manifest"]["status"] == "succeeded"
    events = (tmp_path / job_id(61) / "job.log").read_text().count('"job started"')
    assert events == 1
    # AND a second job still finds one warm server: the prewarm's, or the `run` that came first
    second, _ = timed_launch(moto_server, tmp_path, warm_spec(62, 30), job_processes)
    assert second["manifest"]["status"] == "succeeded"
    assert second["pid"] in (process.pid, reply["pid"])
    time.sleep(0.2)
    assert "handler warm: setup() already done" in (tmp_path / job_id(62) / "job.log").read_text()
