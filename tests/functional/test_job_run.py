"""The instance job end to end against moto: in-process runs, and `batchworker-job launch` as a subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
from botocore.config import Config
from moto import mock_aws
from moto.server import ThreadedMotoServer

from worker.errors import ExitCode
from worker.runner import run_job
from worker.spec import parse_spec
from worker.storage import Storage

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
MODEL_PATH = REPO / "build" / "model" / "digits-cnn.pt"
INPUT, OUTPUT, ARTIFACTS = "job-input", "job-output", "job-artifacts"
MODEL_URI = f"s3://{ARTIFACTS}/models/digits-cnn.pt"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def model_bytes() -> bytes:
    """The real digits CNN; scripts/train_model.py skips training when build/model is up to date."""
    trainer = [sys.executable, str(REPO / "scripts" / "train_model.py")]
    subprocess.run(trainer, check=True, capture_output=True)
    return MODEL_PATH.read_bytes()


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("BATCHWORKER_INSTANCE_ID", raising=False)


@pytest.fixture
def s3(aws_env, model_bytes):
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        for bucket in (INPUT, OUTPUT, ARTIFACTS):
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=ARTIFACTS, Key="models/digits-cnn.pt", Body=model_bytes)
        yield client


def make_spec(job_id: str, key: str, model_uri: str = MODEL_URI, version_id: str | None = None):
    return parse_spec(
        json.dumps(
            {
                "job_id": job_id,
                "input": {"bucket": INPUT, "key": key, "version_id": version_id},
                "output": {"bucket": OUTPUT, "prefix": f"jobs/{job_id}/"},
                "model_uri": model_uri,
                "instance_id": "i-0123456789abcdef0",
            }
        )
    )


def job_id(n: int) -> str:
    return f"j-{n:016x}"


def read_json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=OUTPUT, Key=key)["Body"].read())


def read_predictions(s3, job: str) -> list[dict]:
    text = s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job}/predictions.csv")["Body"].read().decode()
    return list(csv.DictReader(io.StringIO(text)))


def output_keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=OUTPUT).get("Contents", []))


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
        # THEN it succeeds with one prediction per item and a manifest uploaded last
        manifest = read_json(s3, f"jobs/{job}/manifest.json")
        assert code == ExitCode.SUCCEEDED, manifest["error"]
        assert manifest["status"] == "succeeded" and manifest["error"] is None
        assert manifest["items"] == len(truth)
        assert manifest["outputs"] == [f"jobs/{job}/predictions.csv", f"jobs/{job}/job.log"]
        assert manifest["input"] == {"bucket": INPUT, "key": key, "version_id": None}
        assert manifest["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        assert manifest["model_uri"] == MODEL_URI and manifest["instance_id"] == "i-0123456789abcdef0"
        assert set(manifest["timings"]) == {
            "started_at", "finished_at", "download_s", "model_load_s", "inference_s", "upload_s", "total_s"
        }
        rows = read_predictions(s3, job)
        assert list(rows[0])[:4] == ["item", "label", "confidence", "prob_0"] and "prob_9" in rows[0]
        assert len(rows) == len(truth)
        correct += sum(int(row["label"]) == label for row, label in zip(rows, truth))
        total += len(truth)
        if name == "digits.zip":
            assert [row["item"] for row in rows] == [f"digits/{i:02d}.png" for i in range(1, 5)]
        if name == "digits.csv":
            assert [row["item"] for row in rows] == [f"row {i}" for i in range(1, 6)]
        if name.endswith(".png"):
            assert rows[0]["item"] == name
    assert correct / total >= 0.9
    # the model was downloaded once, then served from the cache
    assert len(list((tmp_path / "jobs" / ".model-cache").glob("*.pt"))) == 1
    log = s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job_id(1)}/job.log")["Body"].read().decode()
    events = [json.loads(line)["event"] for line in log.splitlines()]
    assert events[0] == "job started" and "model downloaded" in events
    assert events[-1] == "uploading job.log and manifest"


def test_corrupt_input_gives_failed_manifest_and_exit_2(s3, tmp_path):
    s3.put_object(Bucket=INPUT, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    code = run_job(make_spec(job_id(1), "in/broken.png"), tmp_path)
    manifest = read_json(s3, f"jobs/{job_id(1)}/manifest.json")
    assert code == ExitCode.FAILED
    assert manifest["status"] == "failed" and manifest["items"] == 0
    assert manifest["error"].startswith("broken.png is not a readable PNG image (corrupt or truncated")
    assert manifest["outputs"] == [f"jobs/{job_id(1)}/job.log"]
    assert output_keys(s3) == [f"jobs/{job_id(1)}/job.log", f"jobs/{job_id(1)}/manifest.json"]
    assert json.loads((tmp_path / job_id(1) / "manifest.json").read_text()) == manifest


def test_csv_with_a_short_row_names_it_in_the_manifest(s3, tmp_path):
    rows = ["0," * 63 + "0", "0," * 63 + "0", "0," * 62 + "0"]
    s3.put_object(Bucket=INPUT, Key="input.csv", Body="\n".join(rows).encode())
    assert run_job(make_spec(job_id(2), "input.csv"), tmp_path) == ExitCode.FAILED
    error = read_json(s3, f"jobs/{job_id(2)}/manifest.json")["error"]
    assert error == "input.csv row 3 has 63 values; expected 64 pixel values on the 0-16 scale"


def test_missing_input_and_unsupported_type_are_permanent(s3, tmp_path):
    assert run_job(make_spec(job_id(3), "gone.png"), tmp_path) == ExitCode.FAILED
    assert "does not exist" in read_json(s3, f"jobs/{job_id(3)}/manifest.json")["error"]
    s3.put_object(Bucket=INPUT, Key="notes.txt", Body=b"hello")
    assert run_job(make_spec(job_id(4), "notes.txt"), tmp_path) == ExitCode.FAILED
    assert "unsupported file type" in read_json(s3, f"jobs/{job_id(4)}/manifest.json")["error"]


def test_foreign_model_declares_its_shape_in_a_sidecar(s3, tmp_path):
    # GIVEN a 3x4x4 model without embedded metadata
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    s3.put_object(Bucket=ARTIFACTS, Key="models/foreign.pt", Body=buffer.getvalue())
    s3.put_object(Bucket=INPUT, Key="digit.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    uri = f"s3://{ARTIFACTS}/models/foreign.pt"
    # WHEN it runs without a sidecar THEN the manifest says how to declare the shape
    assert run_job(make_spec(job_id(5), "digit.png", uri), tmp_path) == ExitCode.FAILED
    error = read_json(s3, f"jobs/{job_id(5)}/manifest.json")["error"]
    assert "does not declare its input shape" in error and "models/foreign.json" in error
    # WHEN the sidecar exists THEN the image is fed as 3x4x4 and the 3 classes come out
    s3.put_object(Bucket=ARTIFACTS, Key="models/foreign.json", Body=b'{"input_shape": [3, 4, 4]}')
    assert run_job(make_spec(job_id(6), "digit.png", uri), tmp_path) == ExitCode.SUCCEEDED
    rows = read_predictions(s3, job_id(6))
    assert list(rows[0]) == ["item", "label", "confidence", "prob_0", "prob_1", "prob_2"]


def test_model_that_is_not_torchscript_fails_permanently(s3, tmp_path):
    s3.put_object(Bucket=ARTIFACTS, Key="models/bad.pt", Body=b"not a model")
    s3.put_object(Bucket=INPUT, Key="digit.png", Body=(SAMPLES / "digit-3.png").read_bytes())
    code = run_job(make_spec(job_id(7), "digit.png", f"s3://{ARTIFACTS}/models/bad.pt"), tmp_path)
    assert code == ExitCode.FAILED
    assert "cannot be loaded as TorchScript" in read_json(s3, f"jobs/{job_id(7)}/manifest.json")["error"]


def test_unexpected_error_still_writes_an_honest_failed_manifest(s3, tmp_path, monkeypatch):
    def broken_writer(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("worker.runner.write_predictions", broken_writer)
    s3.put_object(Bucket=INPUT, Key="digits.csv", Body=(SAMPLES / "digits.csv").read_bytes())
    assert run_job(make_spec(job_id(11), "digits.csv"), tmp_path) == ExitCode.FAILED
    manifest = read_json(s3, f"jobs/{job_id(11)}/manifest.json")
    assert manifest["error"].startswith("internal error in the job (RuntimeError); see jobs/")
    assert manifest["items"] == 0 and manifest["outputs"] == [f"jobs/{job_id(11)}/job.log"]


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
    yield f"http://{host}:{port}"
    server.stop()


def test_launch_detaches_and_the_job_uploads_its_manifest(moto_server, model_bytes, tmp_path):
    # GIVEN a moto server with the model and an input
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    for bucket in (INPUT, OUTPUT, ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=ARTIFACTS, Key="models/digits-cnn.pt", Body=model_bytes)
    s3.put_object(Bucket=INPUT, Key="batch/digits.npy", Body=(SAMPLES / "digits.npy").read_bytes())
    job = job_id(9)
    spec = json.dumps(make_spec(job, "batch/digits.npy").to_json())
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
    command = [str(Path(sys.executable).with_name("batchworker-job")), "launch"]
    # WHEN launch gets the spec on stdin
    launched = subprocess.run(command, input=spec.encode(), env=env, capture_output=True, timeout=30)
    # THEN it prints one JSON line with the pid and returns at once
    assert launched.returncode == 0, launched.stderr.decode()
    reply = json.loads(launched.stdout)
    assert reply["job_id"] == job and isinstance(reply["pid"], int)
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
    assert manifest["items"] == 6


def test_launch_rejects_a_bad_spec(tmp_path):
    env = {**os.environ, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
    command = [str(Path(sys.executable).with_name("batchworker-job")), "launch"]
    result = subprocess.run(command, input=b'{"job_id": "../../x"}', env=env, capture_output=True, timeout=30)
    assert result.returncode == 2 and result.stdout == b""
    assert "job_id must match" in json.loads(result.stderr)["error"]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_gives_a_transient_failed_manifest(moto_server, model_bytes, tmp_path):
    # GIVEN a job running in the foreground against a moto server
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    for bucket in (INPUT, OUTPUT, ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=ARTIFACTS, Key="models/digits-cnn.pt", Body=model_bytes)
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
    # WHEN it is terminated (instance stopping) while it imports torch
    process.terminate()
    # THEN it still uploads a failed manifest and exits 75
    assert process.wait(timeout=60) == ExitCode.TRANSIENT
    manifest = json.loads(s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job}/manifest.json")["Body"].read())
    assert manifest["status"] == "failed" and "interrupted (SIGTERM)" in manifest["error"]
