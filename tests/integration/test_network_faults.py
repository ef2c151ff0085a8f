"""Issue 14, networking, on the local cloud: an instance cut off from S3 says so in `batchworker status`.

Fault: the instance host's `no-s3` switch (batchworker/local/instance_host.py) gives every process of the
instance an S3 endpoint that refuses connections, as a private subnet without the S3 gateway endpoint.
Promise: the job can write neither its log nor its manifest, yet `status` names S3 and what to add while the
job is on the instance, and the failed manifest the reaper writes once the job is lost says the same.
"""

from __future__ import annotations

import json

import pytest

from batchworker.local.instance_host import marked_pids
from tests.integration.test_pipeline import put, wait_all_stopped

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_an_instance_cut_off_from_s3_says_so_in_status_and_in_the_failure(local_cloud):
    # GIVEN every instance of the pool cut off from S3, switched while stopped and powered off (no process of
    # an earlier running period left): everything on it starts after the switch (the boot's warm server too)
    wait_all_stopped(local_cloud)
    hosts = [host for host in (local_cloud.local_dir / "instances").iterdir() if host.is_dir()]
    assert hosts
    local_cloud.wait_until(lambda: not any(marked_pids(host.name) for host in hosts), 30,
                           "every instance powered off (none of its processes alive)")
    switches = [host / "no-s3" for host in hosts]
    try:
        for switch in switches:
            switch.touch()
        # WHEN a job is uploaded
        job_id = put(local_cloud, "no-s3-route.json", json.dumps({"workload": "hold", "seconds": 1}).encode())

        # THEN status names S3 and the endpoint to add while the job is on its instance ...
        def shown() -> dict | None:
            status = json.loads(local_cloud.cli("status", job_id, "--json").stdout)
            job = next((job for job in status["jobs"] if job["job_id"] == job_id), None)
            return job if job and "cannot reach S3" in (job.get("instance_problem") or "") else None

        job = local_cloud.wait_until(shown, 90, "status to say the instance cannot reach S3")
        assert "gateway VPC endpoint for S3" in job["instance_problem"]
        assert "cannot reach DynamoDB" not in job["instance_problem"]
        # ... and the reaper's failed manifest (the job could write none) says the same
        manifest = local_cloud.wait_for_manifest(job_id, timeout=90)
        assert manifest["status"] == "failed" and manifest["written_by"] == "control-plane", manifest
        assert "its instance reported: cannot reach S3" in manifest["error"], manifest["error"]
        assert local_cloud.job(job_id)["status"] == "FAILED"
    finally:
        for switch in switches:
            switch.unlink(missing_ok=True)
    # AND the pool stops; the next start has S3 again
    wait_all_stopped(local_cloud, timeout=90)
