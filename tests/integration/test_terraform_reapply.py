"""terraform/ applied to a fresh moto server with the local cloud's variables: a second apply changes nothing.

A perpetual diff would make every `terraform apply` touch resources (and, for the instances, stop them
mid-job), so this is checked on every test run against the same moto the local cloud uses.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import boto3
import pytest
from moto.server import ThreadedMotoServer

from batchworker.local.paths import BUILD_DIR, LAMBDA_BUILD_DIR, MODEL_PATH, SCRIPTS_DIR
from batchworker.local.state import LOCAL_CREDENTIALS, LOCAL_REGION, LocalOptions
from batchworker.local.supervisor import Supervisor
from batchworker.local.terraform import LocalTerraform, terraform_environment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]


@pytest.fixture
def moto_endpoint(monkeypatch):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "AWS_REGION": LOCAL_REGION,
        **LOCAL_CREDENTIALS,
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def build_outputs():
    """What Terraform uploads: the Lambda zips, the job package and the model (built when missing)."""
    if (
        not all((LAMBDA_BUILD_DIR / f"{name}.zip").is_file() for name in ("trigger", "worker", "stop"))
        or not (BUILD_DIR / "job" / "job-package.json").is_file()
    ):
        subprocess.run(
            [sys.executable, str(SCRIPTS_DIR / "build_lambdas.py")], check=True, capture_output=True
        )
    if not MODEL_PATH.is_file():
        subprocess.run([sys.executable, str(SCRIPTS_DIR / "train_model.py")], check=True, capture_output=True)


def test_second_apply_changes_nothing(moto_endpoint, build_outputs, tmp_path, monkeypatch):
    # GIVEN the variables `batchworker local up` applies with (transport ssh, TLS-only policy off, ...)
    work_dir = tmp_path / "terraform"
    for name, value in terraform_environment(work_dir).items():
        monkeypatch.setenv(name, value)  # LocalTerraform sets these process-wide; restore them afterwards
    variables = Supervisor(tmp_path, "reapply-test", LocalOptions()).terraform_variables()
    # A snapshot of the build outputs: a concurrent `make build` must not look like a diff.
    snapshot = tmp_path / "build"
    shutil.copytree(LAMBDA_BUILD_DIR, snapshot / "lambdas")
    shutil.copytree(BUILD_DIR / "job", snapshot / "job")
    shutil.copy2(MODEL_PATH, snapshot / "model.pt")
    variables.update(
        lambda_build_dir=str(snapshot / "lambdas"),
        job_package_dir=str(snapshot / "job"),
        model_source_path=str(snapshot / "model.pt"),
    )
    terraform = LocalTerraform(work_dir, variables)
    terraform.init()

    # WHEN it is applied to a fresh moto server
    terraform.apply()
    outputs = terraform.outputs()
    assert outputs["input_bucket"] != outputs["output_bucket"]
    assert outputs["transport"] == "ssh"

    # THEN a second plan has nothing to do
    if terraform.plan_has_changes():
        _, out, err = terraform.tf.plan(capture_output=True, no_color=None)
        pytest.fail(f"the second apply would change resources:\n{out[-6000:]}\n{err[-2000:]}")

    # WHEN the image lookup answers another AMI (AWS published a new Deep Learning AMI; here: another image)
    current = variables["ami_id"]
    images = boto3.client("ec2").describe_images(Filters=[{"Name": "name", "Values": ["Deep Learning AMI*"]}])["Images"]
    newer = next(image["ImageId"] for image in images if image["ImageId"] != current and image.get("BlockDeviceMappings"))
    actions = LocalTerraform(work_dir, {**variables, "ami_id": newer}).planned_actions()
    # THEN the plan makes a new launch template version and touches no instance (issue 14: AMI drift)
    assert actions.get("aws_launch_template.gpu") == ["update"], actions
    touched = {address: act for address, act in actions.items() if address.startswith(("aws_instance.", "aws_ec2_"))}
    assert touched == {}, f"a new AMI would touch the instances: {touched}"
