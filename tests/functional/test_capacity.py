"""Issue 14, capacity: EC2 answers InsufficientInstanceCapacity for one Availability Zone, or for all of them.

Fault: starts of instances in the short AZs are refused (a wrapper around the EC2 client, as in
test_faults.py; the local cloud does the same inside its moto server, batchworker/local/capacity_faults.py).
Promise: a job placed in the short AZ runs on an instance of another AZ; when every AZ is short, the job
stays QUEUED, `status` says "waiting for capacity", the reaper keeps trying, and the job runs as soon as
capacity comes back; only after `max_capacity_wait_seconds` does it fail, with a manifest that says so.

The jobs go through the worker function's handler, the entry point that is the same before and after this
issue: on the code before it the job failed at the end of instance_ready_timeout_seconds ("did not reach
running in time") and no other instance was tried.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import boto3
from botocore.exceptions import ClientError

from batchworker.cli.views import job_json
from batchworker.control import Upload, accept_upload
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.ledger import InstanceLedger
from batchworker.local import capacity_faults
from batchworker.models import JobStatus, utc_now
from batchworker.reaper import reap
from tests.functional.handler_support import LambdaContext, load_handler
from tests.functional.test_faults import FakeClock, RecordingLauncher


class ShortZones:
    """Forwards to moto's EC2 client, but refuses to start instances in `short` AZs (InsufficientInstanceCapacity)."""

    def __init__(self, client, short: set[str]):
        self.client, self.short = client, short

    def start_instances(self, **kwargs):
        described = self.client.describe_instances(InstanceIds=kwargs["InstanceIds"])["Reservations"]
        zones = {i["Placement"]["AvailabilityZone"] for r in described for i in r["Instances"]}
        if zones & self.short:
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity",
                                         "Message": "We currently do not have sufficient capacity (injected)"}},
                              "StartInstances")
        return self.client.start_instances(**kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def two_zone_pool(stack) -> dict[str, str]:
    """The stack's instance plus one in another AZ's default subnet: {az: instance id}, both stopped."""
    ec2 = boto3.client("ec2")
    first = ec2.describe_instances(InstanceIds=[stack.instance_id])["Reservations"][0]["Instances"][0]
    zone_a = first["Placement"]["AvailabilityZone"]
    subnet_b = next(s for s in ec2.describe_subnets()["Subnets"] if s["AvailabilityZone"] != zone_a)
    second = ec2.run_instances(
        ImageId=first["ImageId"], MinCount=1, MaxCount=1, InstanceType="g4dn.xlarge", SubnetId=subnet_b["SubnetId"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "batchworker:pool", "Value": "bwtest"}]}],
    )["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[second])
    return {zone_a: stack.instance_id, subnet_b["AvailabilityZone"]: second}


def worker_function(monkeypatch, ec2, clock):
    """The worker Lambda (lambdas/worker/app.py) as deployed, but its pool's EC2 client short of capacity and its
    waits on a fake clock (which starts at the real monotonic time the handler takes its deadline from)."""
    monkeypatch.setenv("BATCHWORKER_INSTANCE_READY_TIMEOUT_SECONDS", "300")
    monkeypatch.setenv("BATCHWORKER_MAX_CAPACITY_WAIT_SECONDS", "1800")
    app = load_handler("worker")
    clock.now = time.monotonic()
    app.pool = InstancePool(app.settings.pool_tag, InstanceHistory(app.settings.instance_events_table), client=ec2,
                            sleep=clock.sleep, clock=clock, jitter=lambda s: s)
    app.launcher = RecordingLauncher()
    return app


def dispatch(app, job_id: str) -> dict[str, str]:
    return app.handler({"job_ids": [job_id]}, LambdaContext())["statuses"]


def accept(app, key: str) -> str:
    return accept_upload(Upload(app.settings.input_bucket, key, 1, "e", "v1"), app.settings, app.jobs, app.pool,
                         InstanceLedger(app.settings.instance_events_table), lambda *_: None, boto3.client("s3"))


def state(instance_id):
    described = boto3.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return described[0]["Instances"][0]["State"]["Name"]


def test_a_job_placed_in_a_short_az_runs_in_another(stack, monkeypatch):
    # GIVEN a pool in two AZs, and no capacity in the AZ of the instance the job is placed on
    zones = two_zone_pool(stack)
    clock = FakeClock()
    ec2 = ShortZones(boto3.client("ec2"), set())
    app = worker_function(monkeypatch, ec2, clock)
    job_id = accept(app, "a.png")
    short_instance = app.jobs.get(job_id).instance_id  # placed on a stopped instance of the pool
    [short_zone] = [zone for zone, instance in zones.items() if instance == short_instance]
    [other_instance] = [instance for instance in zones.values() if instance != short_instance]
    ec2.short.add(short_zone)
    boto3.client("ec2").stop_instances(InstanceIds=[short_instance])  # the trigger's own start went through
    # WHEN the worker function dispatches it
    started = clock.now
    outcome = dispatch(app, job_id)
    # THEN it runs on the instance in the other AZ; the short one stays stopped; the ledgers follow the move
    assert outcome == {job_id: "DISPATCHED"}  # launched; the job itself marks RUNNING
    assert [instance for instance, _ in app.launcher.launched] == [other_instance]
    assert state(short_instance) == "stopped" and state(other_instance) == "running"
    assert app.jobs.get(job_id).instance_id == other_instance
    ledger = InstanceLedger(app.settings.instance_events_table)
    assert ledger.read(short_instance).placed_job_ids == frozenset()
    assert ledger.read(other_instance).placed_job_ids == {job_id}
    assert clock.now - started < 120  # tried the short AZ for a while, not the whole ready timeout


def test_when_every_az_is_short_the_job_waits_then_runs_when_capacity_returns(stack, monkeypatch):
    # GIVEN a pool in two AZs, both out of capacity
    zones = two_zone_pool(stack)
    clock = FakeClock()
    ec2 = ShortZones(boto3.client("ec2"), set(zones))
    app = worker_function(monkeypatch, ec2, clock)
    job_id = accept(app, "b.png")
    # WHEN the worker function dispatches it
    outcome = dispatch(app, job_id)
    # THEN it stays QUEUED, not failed; status says it waits for capacity, naming the instances' AZs
    assert outcome == {job_id: "QUEUED"} and app.launcher.launched == []
    shown = job_json(app.jobs.get(job_id))
    assert shown["status"] == "QUEUED" and shown["waiting"].startswith("waiting for capacity: InsufficientInstanceCapacity")
    assert all(zone in shown["waiting"] for zone in zones)
    assert not _manifest_exists(stack, job_id)
    # AND the reaper leaves it alone for a minute, then dispatches it again (no attempt counted)
    invoked = []
    ledger = InstanceLedger(app.settings.instance_events_table)
    assert reap(app.settings, app.jobs, app.pool, ledger, boto3.client("s3"), invoked.append).redispatched == []
    later = utc_now() + timedelta(seconds=61)
    report = reap(app.settings, app.jobs, app.pool, ledger, boto3.client("s3"), invoked.append, now=later)
    assert report.redispatched == [job_id]
    assert invoked == [{"job_ids": [job_id]}] and app.jobs.get(job_id).attempts == 0
    # WHEN capacity comes back in one AZ and that dispatch runs
    ec2.short.clear()
    outcome = dispatch(app, job_id)
    # THEN the job runs, and its waiting note is gone
    assert outcome == {job_id: "DISPATCHED"} and len(app.launcher.launched) == 1
    assert job_json(app.jobs.get(job_id))["waiting"] is None


def test_a_shortage_longer_than_the_maximum_wait_fails_the_job_with_a_manifest_that_says_so(stack, monkeypatch):
    zones = two_zone_pool(stack)
    clock = FakeClock()
    ec2 = ShortZones(boto3.client("ec2"), set(zones))
    app = worker_function(monkeypatch, ec2, clock)
    job_id = accept(app, "c.png")
    dispatch(app, job_id)
    assert app.jobs.get(job_id).status is JobStatus.QUEUED, app.jobs.get(job_id)
    # WHEN the reaper passes after max_capacity_wait_seconds (1800 s here)
    later = utc_now() + timedelta(seconds=1801)
    ledger = InstanceLedger(app.settings.instance_events_table)
    report = reap(app.settings, app.jobs, app.pool, ledger, boto3.client("s3"), [].append, now=later)
    # THEN the job is failed with a manifest naming the shortage and what to do; no instance was left running
    assert report.failed == [job_id]
    manifest = json.loads(boto3.client("s3").get_object(
        Bucket=stack.output_bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read())
    assert manifest["status"] == "failed" and manifest["error"].startswith("no GPU capacity for 18")
    assert "InsufficientInstanceCapacity" in manifest["error"] and "max_capacity_wait_seconds" in manifest["error"]
    assert app.jobs.get(job_id).status is JobStatus.FAILED
    assert {state(instance) for instance in zones.values()} == {"stopped"}


def _manifest_exists(stack, job_id) -> bool:
    listed = boto3.client("s3").list_objects_v2(Bucket=stack.output_bucket, Prefix=f"jobs/{job_id}/")
    return bool(listed.get("Contents"))


def test_the_local_cloud_refuses_starts_in_the_outage_az_until_the_outage_ends(stack, tmp_path):
    # GIVEN moto patched as the local cloud's supervisor patches it, and an outage of 2 s in one AZ
    zones = two_zone_pool(stack)
    (short_zone, short_instance), (_, other_instance) = sorted(zones.items())
    ec2 = boto3.client("ec2")
    capacity_faults.install(tmp_path)
    try:
        capacity_faults.refuse_capacity(tmp_path, [short_zone], 2.0)
        # THEN a start there is refused with the code EC2 uses, and the other AZ starts
        try:
            ec2.start_instances(InstanceIds=[short_instance])
            refused = None
        except ClientError as exc:
            refused = exc.response["Error"]["Code"]
        assert refused == "InsufficientInstanceCapacity" and state(short_instance) == "stopped"
        ec2.start_instances(InstanceIds=[other_instance])
        assert state(other_instance) == "running"
        # AND once the outage is over, the short AZ starts again
        time.sleep(2.1)
        ec2.start_instances(InstanceIds=[short_instance])
        assert state(short_instance) == "running"
    finally:
        capacity_faults.uninstall()
