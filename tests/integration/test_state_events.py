"""No storms: instance state-change events drive dispatch (the local cloud sends them as moto's instances change
state, batchworker/local/ec2_events.py, and delivers them to the worker function as EventBridge does)."""

from __future__ import annotations

import json
import time

import pytest

from batchworker.instances import InstanceHistory
from batchworker.ledger import InstanceLedger
from batchworker.models import isoformat, job_id_for, utc_now

pytestmark = pytest.mark.integration


def test_a_stopped_then_running_event_dispatches_the_jobs_waiting_on_the_instance(local_cloud):
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 60, "every instance stopped")
    env = local_cloud.env
    ledger = InstanceLedger(env["BATCHWORKER_INSTANCE_EVENTS_TABLE"], client=local_cloud.client("dynamodb"))
    history = InstanceHistory(env["BATCHWORKER_INSTANCE_EVENTS_TABLE"], client=local_cloud.client("dynamodb"))
    ec2 = local_cloud.client("ec2")
    instance_ids = [i["InstanceId"] for r in ec2.describe_instances(
        Filters=[{"Name": "tag:batchworker:pool", "Values": [env["BATCHWORKER_POOL_TAG"]]}])["Reservations"]
        for i in r["Instances"]]
    # GIVEN the test holds every instance's dispatch claim, as a dispatcher would
    generations = {i: ledger.claim_dispatch(i, "the-test", 90).generation for i in instance_ids}
    try:
        key = "state-events/hold.json"
        response = local_cloud.client("s3").put_object(
            Bucket=local_cloud.input_bucket, Key=key, Body=json.dumps({"workload": "hold", "seconds": 1}).encode())
        job_id = job_id_for(local_cloud.input_bucket, key, response.get("VersionId") or response.get("ETag"))
        # WHEN the trigger places the job and starts its instance: the worker invoked by the trigger and the one
        # invoked by the instance's `running` event both find it claimed, hand the job over and return
        job = local_cloud.wait_until(lambda: (local_cloud.job(job_id) or {}).get("instance_id") and local_cloud.job(job_id),
                                     60, "the job placed")
        instance_id = job["instance_id"]
        local_cloud.wait_until(lambda: ledger.read(instance_id).generation >= generations[instance_id] + 3, 60,
                               "placement + two hand-overs (trigger's worker, running event's worker)")
        time.sleep(2)
        assert local_cloud.job(job_id)["status"] == "QUEUED"  # nobody launched it behind the claim
    finally:
        for i in instance_ids:
            ledger.drop_dispatch(i, "the-test")
    assert local_cloud.job(job_id)["status"] == "QUEUED"
    # The instance runs with a job queued on it and no dispatcher: only an event brings one now (the reaper's
    # fallback waits 120 s). Stop it, as its dead-man timer or an operator might.
    stopped_at, stop_time = time.time(), isoformat(utc_now())
    ec2.stop_instances(InstanceIds=[instance_id])
    # THEN its `stopped` event brings a dispatcher that starts it again, and its `running` event one that
    # launches the job: it runs once
    manifest = local_cloud.wait_for_manifest(job_id, timeout=100)
    assert manifest["status"] == "succeeded", manifest.get("error")
    assert time.time() - stopped_at < 110  # not the reaper's fallback
    starts = [e for e in history.events(instance_id)
              if e["state"] == "start" and e["at"] >= stop_time and "job(s) waiting" in e["reason"]]
    assert starts, "the worker did not start the instance on its stopped event"
    final = local_cloud.wait_until(lambda: (local_cloud.job(job_id) or {}).get("status") == "SUCCEEDED" and local_cloud.job(job_id),
                                   60, "the job recorded as SUCCEEDED")
    assert int(final["attempts"]) == 1
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 90, "every instance stopped")
