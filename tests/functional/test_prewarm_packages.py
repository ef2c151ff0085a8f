"""Pre-warm of the job packages that started an instance (issue 13): the trigger names them on the instance's
ledger item at the start (batchworker/ledger.py note_start), `batchworker-job prewarm` reads them at boot
and sets them up before the first job of the start arrives. Real processes against a moto server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from batchworker.jobpkg import build_archive
from batchworker.ledger import InstanceLedger

INPUT, OUTPUT, ARTIFACTS, EVENTS = "pw-input", "pw-output", "pw-artifacts", "pw-instance-events"
INSTANCE_ID = "i-0123456789abcdef0"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
HANDLER = """
    import os
    from pathlib import Path

    class Job:
        def setup(self, ctx):
            self.pid = os.getpid()

        def process(self, items, ctx):
            for item in items:
                yield item, {"chars": len(Path(item.path).read_text()), "pid": self.pid}
"""


@pytest.fixture
def cloud():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=url, **credentials)
    ddb = boto3.client("dynamodb", endpoint_url=url, **credentials)
    for bucket in (INPUT, OUTPUT, ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    ddb.create_table(TableName=EVENTS, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"},
                                {"AttributeName": "at", "KeyType": "RANGE"}],
                     AttributeDefinitions=[{"AttributeName": "instance_id", "AttributeType": "S"},
                                           {"AttributeName": "at", "AttributeType": "S"}])
    yield url, s3, ddb
    server.stop()


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def deploy(tmp_path: Path, s3) -> dict:
    """A package archive in the artifacts bucket, as `batchworker job deploy` leaves it; its spec field."""
    source = tmp_path / "pkg"
    source.mkdir()
    (source / "job.toml").write_text('name = "wordcount"\nentrypoint = "handler:Job"\naccept = [".txt"]\n')
    (source / "handler.py").write_text(textwrap.dedent(HANDLER))
    info = build_archive(source, tmp_path / "dist")
    key = f"job-packages/wordcount/{info.sha256}.tar.gz"
    s3.put_object(Bucket=ARTIFACTS, Key=key, Body=info.path.read_bytes())
    return {"name": "wordcount", "version": info.sha256, "uri": f"s3://{ARTIFACTS}/{key}"}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s")
        time.sleep(0.02)


def test_the_package_that_started_the_instance_is_set_up_before_its_job_arrives(cloud, tmp_path, processes):
    url, s3, ddb = cloud
    package = deploy(tmp_path, s3)
    s3.put_object(Bucket=INPUT, Key="wordcount/a.txt", Body=b"four words in here\n")
    # GIVEN the trigger started the instance for a job of that package (it names it on the ledger item)
    InstanceLedger(EVENTS, client=ddb).note_start(INSTANCE_ID, {package["name"]: package["version"]})
    # AND the instance booted: prewarm took the server role (its socket is open) and is still preparing
    job_root = tmp_path / "jobs"
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": url, "BATCHWORKER_JOB_ROOT": str(job_root),
           "BATCHWORKER_INSTANCE_ID": INSTANCE_ID}
    log = tmp_path / "prewarm.log"
    batchworker_job = str(Path(sys.executable).with_name("batchworker-job"))
    with log.open("wb") as out:
        processes.append(subprocess.Popen(
            [batchworker_job, "prewarm", "--packages-uri", f"s3://{ARTIFACTS}/job-packages/",
             "--instance-events-table", EVENTS, "--linger-seconds", "30"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    prewarm = processes[-1]
    wait_until(lambda: (job_root / ".server.sock").exists() or prewarm.poll() is not None, 60, "prewarm's server")
    # WHEN that job arrives at once
    job_id = "j-00000000000000a1"
    spec = {"job_id": job_id, "input": {"bucket": INPUT, "key": "wordcount/a.txt", "version_id": None},
            "output": {"bucket": OUTPUT, "prefix": f"jobs/{job_id}/"}, "instance_id": INSTANCE_ID,
            "package": package, "params": {}, "server_linger_seconds": 30}
    launched = subprocess.run([batchworker_job, "launch"], input=json.dumps(spec).encode(), env=env,
                              capture_output=True, timeout=60)
    assert launched.returncode == 0, launched.stderr.decode()

    def manifest() -> dict | None:
        try:
            return json.loads(s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job_id}/manifest.json")["Body"].read())
        except s3.exceptions.NoSuchKey:
            return None

    wait_until(lambda: manifest() is not None, 120, f"the manifest of {job_id}")
    done = manifest()
    # THEN it ran once, in prewarm's server, in the handler process prewarm had set up: its own job did not
    # call setup()
    assert done["status"] == "succeeded", done["error"]
    assert json.loads(launched.stdout)["pid"] == prewarm.pid
    assert done["handler"]["setup_called"] is False
    boot = log.read_text()
    assert f"started for job packages: wordcount {package['version'][:12]}" in boot
    assert f"handler pid {done['handler']['pid']}" in boot
    assert (job_root / job_id / "job.log").read_text().count('"job started"') == 1
    results = s3.get_object(Bucket=OUTPUT, Key=f"jobs/{job_id}/results.csv")["Body"].read().decode()
    assert results.splitlines() == ["item,chars,pid", f"a.txt,19,{done['handler']['pid']}"]
