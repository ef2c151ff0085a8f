"""Issue 14, runaway jobs: the cap is enforced on the instance, and a job's manifest is written once.

Fault 1: a job runs past its cap while another job keeps the instance busy (so no stop would end it).
Promise: the runaway's process is killed at the cap, its failed manifest says so, the other job succeeds,
and the job table (fed by the stop function from the manifests) agrees with each manifest.

Fault 2: the control plane fails a job (the reaper, past its cap or given up as lost) while the job still
runs, and the job later finishes. Promise: the job cannot write "succeeded" over the failed manifest; the
manifest stays failed, and the table stays FAILED.

Both fail on the code before this issue: no process was killed, and the late manifest replaced the first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from batchworker.cli.views import job_json
from batchworker.config import Settings
from batchworker.control import fail_job, finish_job
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.local.instance_host import UNREACHABLE_ENDPOINT
from batchworker.models import Job, JobStatus, utc_now
from tests.functional.test_job_run import (  # noqa: F401  (moto_server, s3, aws_env, digits_archive, ... are fixtures)
    ARTIFACTS,
    AWS_ENV,
    INPUT,
    OUTPUT,
    TABLE,
    _package_for_specs,
    aws_env,
    compute_file,
    create_jobs_table,
    digits_archive,
    job_id,
    job_item,
    launch_job,
    make_spec,
    moto_server,
    package_ref,
    put_package,
    read_json,
    run_job,
    s3,
    server_clients,
    wait_for_manifests,
)
from worker.errors import ExitCode

EVENTS_TABLE = "job-instance-events"


def is_process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def settings_for(table: str) -> Settings:
    return Settings.from_env({
        "BATCHWORKER_INPUT_BUCKET": INPUT, "BATCHWORKER_OUTPUT_BUCKET": OUTPUT, "BATCHWORKER_JOBS_TABLE": table,
        "BATCHWORKER_INSTANCE_EVENTS_TABLE": EVENTS_TABLE, "BATCHWORKER_POOL_TAG": "job",
        "BATCHWORKER_WORKER_FUNCTION": "job-worker",
        "BATCHWORKER_PARAMETER_PREFIX": "/job", "BATCHWORKER_JOB_COMMAND": "batchworker-job launch",
        "BATCHWORKER_ARTIFACTS_BUCKET": ARTIFACTS,
    })


def create_events_table(ddb) -> None:
    ddb.create_table(
        TableName=EVENTS_TABLE, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("instance_id", "at")],
        KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"}, {"AttributeName": "at", "KeyType": "RANGE"}],
    )


@pytest.fixture
def launched_pids():
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            if b"worker.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_job_past_its_cap_is_killed_on_a_busy_instance_and_says_so(
    moto_server, digits_archive, tmp_path, launched_pids  # noqa: F811
):
    # GIVEN two DISPATCHED jobs on one instance, each in its own process: a runaway ("hold" 120 s, cap 4 s)
    # and a busy neighbour ("hold" 12 s, cap 600 s) that keeps the instance up well past the runaway's cap
    out, ddb = server_clients(moto_server)
    put_package(out, digits_archive)
    out.put_object(Bucket=INPUT, Key="runaway.json", Body=compute_file(120, "hold"))
    out.put_object(Bucket=INPUT, Key="busy.json", Body=compute_file(12, "hold"))
    runaway, busy = job_id(140), job_id(141)
    create_jobs_table(ddb, {runaway: "DISPATCHED", busy: "DISPATCHED"})
    create_events_table(ddb)
    lease = {"table": TABLE, "seconds": 30}
    busy_reply = launch_job(moto_server, tmp_path, make_spec(
        busy, "busy.json", lease=lease, max_runtime_seconds=600, server_linger_seconds=0).to_json())
    runaway_reply = launch_job(moto_server, tmp_path, make_spec(
        runaway, "runaway.json", lease=lease, max_runtime_seconds=4, server_linger_seconds=0).to_json())
    launched_pids.extend([busy_reply["pid"], runaway_reply["pid"]])
    assert busy_reply["pid"] != runaway_reply["pid"]
    # WHEN the runaway passes its cap
    manifest = wait_for_manifests(out, [runaway], tmp_path, timeout=60)[runaway]
    # THEN its failed manifest says it ran past the maximum runtime, and its process is gone soon after
    assert manifest["status"] == "failed" and "maximum runtime" in manifest["error"], manifest
    assert manifest.get("written_by") != "control-plane"  # the instance ended it, not the reaper
    deadline = time.monotonic() + 30
    while is_process_alive(runaway_reply["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not is_process_alive(runaway_reply["pid"]), "the runaway job's process outlived its cap"
    assert manifest["timings"]["total_s"] < 60
    # AND the neighbour was untouched: it still runs, and then succeeds
    assert is_process_alive(busy_reply["pid"])
    assert wait_for_manifests(out, [busy], tmp_path, timeout=90)[busy]["status"] == "succeeded"
    # AND the job table, fed by the stop function from the manifests, agrees with each of them
    jobs, ledger = JobStore(TABLE, client=ddb), InstanceLedger(EVENTS_TABLE, client=ddb)
    for job in (runaway, busy):
        key = f"jobs/{job}/manifest.json"
        finish_job(json.loads(out.get_object(Bucket=OUTPUT, Key=key)["Body"].read()), key, jobs, ledger)
    assert job_item(ddb, runaway)["status"] == "FAILED" and job_item(ddb, busy)["status"] == "SUCCEEDED"


def test_a_late_writer_cannot_overwrite_the_failed_manifest(s3, tmp_path):  # noqa: F811
    # GIVEN a job running on the instance (a 3-second "hold")
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    create_jobs_table(ddb, {job_id(150): "DISPATCHED"})
    create_events_table(ddb)
    s3.put_object(Bucket=INPUT, Key="late.json", Body=compute_file(3, "hold"))
    spec = make_spec(job_id(150), "late.json", lease={"table": TABLE, "seconds": 30})
    codes: list[ExitCode] = []
    runner = threading.Thread(target=lambda: codes.append(run_job(spec, tmp_path)))
    runner.start()
    log = tmp_path / job_id(150) / "job.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "handler setup() done" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # WHEN the control plane fails it meanwhile (the reaper judged it past its cap)
    jobs = JobStore(TABLE, client=ddb)
    job = Job(job_id(150), JobStatus.RUNNING, INPUT, "late.json")
    fail_job(job, "the job ran past the maximum runtime", "i-1", settings_for(TABLE), jobs, s3)
    runner.join(60)
    # THEN the job's own "succeeded" manifest was refused: the failed one stands, and the job knows it
    assert codes == [ExitCode.FAILED]
    manifest = read_json(s3, f"jobs/{job_id(150)}/manifest.json")
    assert manifest["status"] == "failed" and manifest["written_by"] == "control-plane"
    assert "not recorded" in log.read_text()
    # AND the table and the manifest agree after the stop function has read it
    finish_job(manifest, f"jobs/{job_id(150)}/manifest.json", jobs, InstanceLedger(EVENTS_TABLE, client=ddb))
    assert job_item(ddb, job_id(150))["status"] == "FAILED"
    # AND a second control-plane verdict does not replace the first either
    assert not fail_job(job, "another verdict", "i-1", settings_for(TABLE), jobs, s3)
    assert read_json(s3, f"jobs/{job_id(150)}/manifest.json")["error"] == "the job ran past the maximum runtime"


def test_a_job_that_cannot_reach_dynamodb_stops_itself_and_says_why(
    moto_server, digits_archive, tmp_path, launched_pids  # noqa: F811
):
    # Fault (issue 14): the instance has no route to DynamoDB (a private subnet without the gateway endpoint;
    # the local instance host does the same with its `no-dynamodb` switch). S3 is reachable.
    # Promise: the job's log names DynamoDB at once; the job cannot renew its lease, so instead of running on
    # unobserved it stops itself after one lease: a failed manifest says why, and its process exits.
    out, ddb = server_clients(moto_server)
    put_package(out, digits_archive)
    out.put_object(Bucket=INPUT, Key="cut-off.json", Body=compute_file(120, "hold"))
    job = job_id(160)
    create_jobs_table(ddb, {job: "DISPATCHED"})
    spec = make_spec(job, "cut-off.json", lease={"table": TABLE, "seconds": 3}, server_linger_seconds=0)
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(tmp_path),
           "AWS_ENDPOINT_URL_DYNAMODB": UNREACHABLE_ENDPOINT}
    launched = subprocess.run([str(Path(sys.executable).with_name("batchworker-job")), "launch"],
                              input=json.dumps(spec.to_json()).encode(), env=env, capture_output=True, timeout=30)
    assert launched.returncode == 0, launched.stderr.decode()
    reply = json.loads(launched.stdout)
    launched_pids.append(reply["pid"])
    manifest = wait_for_manifests(out, [job], tmp_path, timeout=60)[job]
    assert manifest["status"] == "failed", manifest
    assert "could not renew its lease" in manifest["error"] and "cannot reach DynamoDB" in manifest["error"]
    assert manifest["timings"]["total_s"] < 60
    deadline = time.monotonic() + 30
    while is_process_alive(reply["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not is_process_alive(reply["pid"]), "the job ran on without a lease"
    log = out.get_object(Bucket=OUTPUT, Key=f"jobs/{job}/job.log")["Body"].read().decode()
    assert "network check: cannot reach DynamoDB" in log and "cannot reach S3" not in log


def test_an_instance_that_cannot_reach_s3_or_ssm_says_so_in_status(moto_server, tmp_path, launched_pids):  # noqa: F811
    # Fault (issue 14): the instance has no route to S3 or SSM (a private subnet without those endpoints; the
    # local instance host does the same with its `no-s3` and `no-ssm` switches). DynamoDB is reachable.
    # Promise: the job can write neither its log nor its manifest to S3, but `batchworker status` names what
    # the instance cannot reach and what to add, from the job's row (the job's network check writes it there).
    out, ddb = server_clients(moto_server)
    out.put_object(Bucket=INPUT, Key="no-route.json", Body=compute_file(1, "hold"))
    job = job_id(170)
    create_jobs_table(ddb, {job: "DISPATCHED"})
    spec = make_spec(job, "no-route.json", lease={"table": TABLE, "seconds": 30}, server_linger_seconds=0)
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "BATCHWORKER_JOB_ROOT": str(tmp_path),
           "AWS_ENDPOINT_URL_S3": UNREACHABLE_ENDPOINT, "AWS_ENDPOINT_URL_SSM": UNREACHABLE_ENDPOINT}
    launched = subprocess.run([str(Path(sys.executable).with_name("batchworker-job")), "launch"],
                              input=json.dumps(spec.to_json()).encode(), env=env, capture_output=True, timeout=30)
    assert launched.returncode == 0, launched.stderr.decode()
    reply = json.loads(launched.stdout)
    launched_pids.append(reply["pid"])
    # WHEN the job's process has tried and given up (no input without S3)
    deadline = time.monotonic() + 90
    while is_process_alive(reply["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not is_process_alive(reply["pid"]), "the job's process did not end"
    assert "Contents" not in out.list_objects_v2(Bucket=OUTPUT, Prefix=f"jobs/{job}/")  # nothing reached S3
    # THEN status (its JSON, from the job's row) names S3 and SSM and what to add, and not DynamoDB
    shown = job_json(JobStore(TABLE, client=ddb).get(job))
    text = json.dumps(shown)
    assert "cannot reach S3" in text and "cannot reach SSM" in text, f"status does not say what is unreachable: {text}"
    assert "gateway VPC endpoint for S3" in text and "cannot reach DynamoDB" not in text
    # AND the status table's note starts with it
    from batchworker.cli.status_table import note

    assert note(JobStore(TABLE, client=ddb).get(job), utc_now()).startswith("instance cannot reach S3 (")
