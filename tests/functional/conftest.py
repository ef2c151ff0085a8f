"""In-process moto stack shaped like the Terraform one, and a loader for the Lambda handlers."""

from __future__ import annotations

import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from batchworker.jobpkg.registry import PackageRegistry
from batchworker.jobs import INDEX_ATTRIBUTES, SHARD_ATTRIBUTE, STATUS_INDEX

REPO = Path(__file__).resolve().parents[2]
PREFIX = "bwtest"
ARTIFACTS = f"{PREFIX}-artifacts"
# Every job runs a job package, as in a deployment: the stack deploys this one as its default job.
DEFAULT_JOB = "stackjob"
DEFAULT_JOB_TOML = f'name = "{DEFAULT_JOB}"\nentrypoint = "handler:Job"\naccept = [".png", ".npy", ".csv"]\n'


@dataclass
class Stack:
    env: dict
    instance_id: str
    input_bucket: str = f"{PREFIX}-input"
    output_bucket: str = f"{PREFIX}-output"
    artifacts_bucket: str = ARTIFACTS
    jobs_table: str = f"{PREFIX}-jobs"
    events_table: str = f"{PREFIX}-instance-events"

    def client(self, service):
        return boto3.client(service, region_name="us-east-1")

    def instance_state(self) -> str:
        reservations = self.client("ec2").describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        return reservations[0]["Instances"][0]["State"]["Name"]

    def job_item(self, job_id):
        return self.client("dynamodb").get_item(TableName=self.jobs_table, Key={"job_id": {"S": job_id}}).get("Item")


AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1", "POWERTOOLS_SERVICE_NAME": "batchworker-test",
}


@pytest.fixture
def stack(monkeypatch):
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield create_stack(monkeypatch)


@pytest.fixture
def http_stack(monkeypatch):
    """The same stack, every call over HTTP to a moto server (boto3 clients follow AWS_ENDPOINT_URL)."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    try:
        yield create_stack(monkeypatch)
    finally:
        server.stop()


def create_stack(monkeypatch) -> Stack:
    """Buckets, tables, the default job and one stopped pool instance, shaped like the Terraform ones; the
    functions' env set."""
    s3 = boto3.client("s3", region_name="us-east-1")
    for bucket in (f"{PREFIX}-input", f"{PREFIX}-output", ARTIFACTS):
        s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=f"{PREFIX}-input", VersioningConfiguration={"Status": "Enabled"})
    deploy_package(s3, DEFAULT_JOB_TOML)
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    ddb.create_table(
        TableName=f"{PREFIX}-jobs", BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": n, "AttributeType": "S"} for n in ("job_id", SHARD_ATTRIBUTE, "created_at")
        ],
        KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[{
            "IndexName": STATUS_INDEX,
            "KeySchema": [{"AttributeName": SHARD_ATTRIBUTE, "KeyType": "HASH"},
                          {"AttributeName": "created_at", "KeyType": "RANGE"}],
            "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": list(INDEX_ATTRIBUTES)},
        }],
    )
    ddb.create_table(
        TableName=f"{PREFIX}-instance-events", BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("instance_id", "at")],
        KeySchema=[{"AttributeName": "instance_id", "KeyType": "HASH"}, {"AttributeName": "at", "KeyType": "RANGE"}],
    )
    ec2 = boto3.client("ec2", region_name="us-east-1")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance_id = ec2.run_instances(
        ImageId=ami, MinCount=1, MaxCount=1, InstanceType="g4dn.xlarge",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "batchworker:pool", "Value": PREFIX}]}],
    )["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])
    env = {
        "BATCHWORKER_INPUT_BUCKET": f"{PREFIX}-input",
        "BATCHWORKER_OUTPUT_BUCKET": f"{PREFIX}-output",
        "BATCHWORKER_ARTIFACTS_BUCKET": ARTIFACTS,
        "BATCHWORKER_DEFAULT_JOB": DEFAULT_JOB,
        "BATCHWORKER_JOBS_TABLE": f"{PREFIX}-jobs",
        "BATCHWORKER_INSTANCE_EVENTS_TABLE": f"{PREFIX}-instance-events",
        "BATCHWORKER_POOL_TAG": PREFIX,
        "BATCHWORKER_WORKER_FUNCTION": f"{PREFIX}-worker",
        "BATCHWORKER_PARAMETER_PREFIX": f"/{PREFIX}",
        "BATCHWORKER_JOB_COMMAND": "/opt/batchworker/venv/bin/batchworker-job launch",
        "BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS": "5",
        # As in the local cloud; tests/functional/test_ssm_transport.py switches to ssm.
        "BATCHWORKER_TRANSPORT": "ssh",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Stack(env=env, instance_id=instance_id)


def deploy_package(s3, toml: str, body: str = "class Job: ...\n"):
    """Deploy a job package (job.toml + handler.py) to the stack's artifacts bucket; returns its PackageRef."""
    with tempfile.TemporaryDirectory(prefix="bwtest-package-") as folder:
        (Path(folder) / "job.toml").write_text(toml)
        (Path(folder) / "handler.py").write_text(body)
        return PackageRegistry(ARTIFACTS, s3).deploy(Path(folder)).ref
