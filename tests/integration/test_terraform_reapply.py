"""terraform/ applied to a fresh moto server with the local cloud's variables, then planned again: what a later
`terraform apply` would do, and what the plan refuses.

A perpetual diff would make every `terraform apply` touch resources (and, for the instances, stop them
mid-job). Issue 14's Terraform promises are checked here on the applied resources, not on the HCL text: a
newer Deep Learning AMI replaces no instance, the pool spreads over the AZs of `subnet_ids`, both tables
expire rows (TTL), global names carry the region, and a batch size over 10 without a batching window
fails the plan. On the Terraform before issue 14 each of these tests failed on the behaviour.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from datetime import datetime, timezone

import boto3
import pytest
from moto.server import ThreadedMotoServer

from batchworker.local.paths import BUILD_DIR, LAMBDA_BUILD_DIR, MODEL_PATH, SCRIPTS_DIR
from batchworker.local.state import LOCAL_CREDENTIALS, LOCAL_REGION, LocalOptions
from batchworker.local.supervisor import Supervisor
from batchworker.local.terraform import LocalTerraform, terraform_environment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

DLAMI_NAME = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch {version} (Ubuntu 24.04) {date}"


def publish_dlami(version: str, date: str) -> str:
    """AWS publishes a Deep Learning AMI: an amazon-owned x86_64 image of the DLAMI line, made the way moto makes
    the images it ships (RegisterImage over the API makes one owned by the caller, which the lookup skips)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][LOCAL_REGION]
    image_id = random_ami_id()
    backend.amis[image_id] = Ami(
        backend, image_id, name=DLAMI_NAME.format(version=version, date=date), owner_alias="amazon", public=True,
        architecture="x86_64", virtualization_type="hvm", root_device_type="ebs", root_device_name="/dev/sda1",
        creation_date=datetime.strptime(date, "%Y%m%d").replace(tzinfo=timezone.utc),
    )
    return image_id


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """terraform/ applied once to a fresh moto server: (LocalTerraform, variables, outputs, the AMI it found)."""
    tmp_path = tmp_path_factory.mktemp("reapply")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    work_dir = tmp_path / "terraform"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": LOCAL_REGION, "AWS_REGION": LOCAL_REGION,
                            **LOCAL_CREDENTIALS, **terraform_environment(work_dir)}.items():
            env.setenv(name, value)  # LocalTerraform sets the last ones process-wide; restored afterwards
        try:
            yield _apply(tmp_path, work_dir)
        finally:
            server.stop()


def _apply(tmp_path, work_dir):
    _build_outputs()
    # GIVEN the variables `batchworker local up` applies with (transport ssh, TLS-only policy off, ...), but
    # the image found by the DLAMI lookup (ami_id null, as on AWS) and a pool of two over two AZs
    variables = Supervisor(tmp_path, "reapply-test", LocalOptions()).terraform_variables()
    ec2 = boto3.client("ec2")
    subnets = sorted(ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"],
                     key=lambda subnet: subnet["AvailabilityZone"])
    current = publish_dlami("2.8", "20260105")
    variables.update(ami_id=None, instance_count=2, subnet_ids=[subnet["SubnetId"] for subnet in subnets[:2]])
    # A snapshot of the build outputs: a concurrent `make build` must not look like a diff.
    snapshot = tmp_path / "build"
    shutil.copytree(LAMBDA_BUILD_DIR, snapshot / "lambdas")
    shutil.copytree(BUILD_DIR / "job", snapshot / "job")
    variables.update(
        lambda_build_dir=str(snapshot / "lambdas"),
        job_package_dir=str(snapshot / "job"),
    )
    terraform = LocalTerraform(work_dir, variables)
    terraform.init()
    # WHEN it is applied to a fresh moto server
    terraform.apply()
    return terraform, variables, terraform.outputs(), current


def _build_outputs() -> None:
    """What Terraform uploads: the Lambda zips, the job package and the model (built when missing)."""
    if (
        not all((LAMBDA_BUILD_DIR / f"{name}.zip").is_file() for name in ("trigger", "worker", "stop"))
        or not (BUILD_DIR / "job" / "job-package.json").is_file()
    ):
        subprocess.run([sys.executable, str(SCRIPTS_DIR / "build_lambdas.py")], check=True, capture_output=True)
    if not MODEL_PATH.is_file():
        subprocess.run([sys.executable, str(SCRIPTS_DIR / "train_model.py")], check=True, capture_output=True)


def plan(applied, name: str, *flags: str, **overrides) -> tuple[int, dict | None, str]:
    """terraform plan of the applied state with the variables changed by `overrides`: (exit code, plan JSON, stderr)."""
    terraform, variables, _, _ = applied
    var_file = terraform.work_dir / f"{name}.tfvars.json"
    var_file.write_text(json.dumps({**variables, **overrides}))
    plan_file = terraform.work_dir / f"{name}.tfplan"
    code, out, err = terraform.tf.cmd(
        "plan", "-input=false", f"-state={terraform.state_path}", f"-var-file={var_file}", f"-out={plan_file}",
        *flags, capture_output=True, no_color=None, input=None)
    if code != 0:
        return code, None, f"{err}\n{out}"
    code, out, err = terraform.tf.cmd("show", "-json", str(plan_file), capture_output=True, no_color=None)
    assert code == 0, err
    return 0, json.loads(out), err


def changes(planned: dict) -> dict[str, dict]:
    """address -> change, no-ops and reads left out."""
    return {c["address"]: c["change"] for c in planned.get("resource_changes", [])
            if c["change"]["actions"] not in (["no-op"], ["read"])}


def test_second_apply_changes_nothing(applied):
    terraform, _, outputs, _ = applied
    assert outputs["input_bucket"] != outputs["output_bucket"]
    assert outputs["transport"] == "ssh"
    # THEN a second plan has nothing to do
    if terraform.plan_has_changes():
        _, out, err = terraform.tf.plan(capture_output=True, no_color=None)
        pytest.fail(f"the second apply would change resources:\n{out[-6000:]}\n{err[-2000:]}")


def test_a_newer_deep_learning_ami_replaces_no_instance(applied):
    # GIVEN instances made from the newest DLAMI of the day they were created
    _, _, outputs, current = applied
    templates = boto3.client("ec2").describe_launch_template_versions(LaunchTemplateName=f"{outputs['pool_tag']}-gpu")
    assert {v["LaunchTemplateData"]["ImageId"] for v in templates["LaunchTemplateVersions"]} == {current}
    # WHEN AWS publishes a newer one, and the operator plans a routine apply
    newer = publish_dlami("2.9", "20260317")
    code, planned, err = plan(applied, "newer-ami")
    assert code == 0, err
    touched = changes(planned)
    # THEN the lookup follows it into a new launch template version, and no instance is touched
    assert touched.get("aws_launch_template.gpu", {}).get("actions") == ["update"], touched.keys()
    assert touched["aws_launch_template.gpu"]["after"]["image_id"] == newer
    on_instances = {address: change["actions"] for address, change in touched.items()
                    if address.startswith(("aws_instance.", "aws_ec2_instance_state."))}
    assert on_instances == {}, f"a newer AMI would touch the instances: {on_instances}"


def test_the_pool_spreads_over_the_azs_of_subnet_ids(applied):
    _, _, outputs, _ = applied
    reservations = boto3.client("ec2").describe_instances(
        Filters=[{"Name": "tag:batchworker:pool", "Values": [outputs["pool_tag"]]}])
    zones = sorted(i["Placement"]["AvailabilityZone"] for r in reservations["Reservations"] for i in r["Instances"])
    assert len(zones) == 2 and len(set(zones)) == 2, f"the pool's instances are not spread over two AZs: {zones}"


def test_both_tables_expire_their_rows(applied):
    _, _, outputs, _ = applied
    dynamodb = boto3.client("dynamodb")
    for table in (outputs["jobs_table"], outputs["instance_events_table"]):
        ttl = dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
        assert (ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")) == ("ENABLED", "expires_at"), (table, ttl)


def test_global_names_carry_the_region(applied):
    # Buckets (global) and IAM roles and the instance profile (account-wide): a second region with the same
    # name_prefix must not collide.
    _, _, outputs, _ = applied
    buckets = [outputs[name] for name in ("input_bucket", "output_bucket")]
    assert all(bucket.endswith(f"-{LOCAL_REGION}") for bucket in buckets), buckets
    iam = boto3.client("iam")
    roles = [role["RoleName"] for role in iam.list_roles()["Roles"] if role["RoleName"].startswith(outputs["pool_tag"])]
    assert roles and all(role.endswith(f"-{LOCAL_REGION}") for role in roles), roles
    profiles = [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]]
    assert profiles and all(profile.endswith(f"-{LOCAL_REGION}") for profile in profiles), profiles


def test_a_batch_size_over_ten_without_a_batching_window_fails_the_plan(applied):
    # AWS refuses an SQS event source mapping with more than 10 messages a batch and no window (at apply,
    # after other resources changed); the plan must refuse it first, naming both variables.
    code, _, err = plan(applied, "batch-window", "-refresh=false", event_source_batch_size=20,
                        trigger_batching_window_seconds=0)
    assert code != 0, "the plan accepted event_source_batch_size = 20 with trigger_batching_window_seconds = 0"
    assert "event_source_batch_size" in err and "trigger_batching_window_seconds" in err, err[-2000:]


def test_a_customer_managed_ebs_key_is_granted_to_the_roles_that_start_instances(applied):
    # GIVEN an account that encrypts volumes with its own KMS key
    key = f"arn:aws:kms:{LOCAL_REGION}:123456789012:key/0f0e0d0c-0000-4000-8000-000000000001"
    code, planned, err = plan(applied, "ebs-key", "-refresh=false", ebs_kms_key_id=key)
    assert code == 0, err
    policies = {change["address"]: json.loads(change["change"]["after"]["policy"])
                for change in planned["resource_changes"] if change["address"].startswith("aws_iam_role_policy.lambda")}
    # THEN the trigger and the worker (they start instances) may make EBS's grant and decrypt through EC2 only,
    # with that key and nothing else; the other functions get nothing of it
    for function in ("trigger", "worker"):
        statements = {s.get("Sid"): s for s in policies[f'aws_iam_role_policy.lambda["{function}"]']["Statement"]}
        grant, decrypt = statements["EbsKeyGrant"], statements["EbsKeyDecrypt"]
        assert (grant["Action"], grant["Resource"]) == ("kms:CreateGrant", key), grant
        assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}, grant
        assert (decrypt["Action"], decrypt["Resource"]) == ("kms:Decrypt", key), decrypt
        assert decrypt["Condition"] == {"StringEquals": {"kms:ViaService": f"ec2.{LOCAL_REGION}.amazonaws.com"}}
    for address, policy in policies.items():
        if address.endswith(('["trigger"]', '["worker"]')):
            continue
        assert not [s for s in policy["Statement"] if "kms" in json.dumps(s.get("Action"))], address
