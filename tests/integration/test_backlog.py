"""Waiting is not running: a backlog longer than the runtime cap, of jobs each well under it, all succeed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from batchworker.models import job_id_for

pytestmark = pytest.mark.integration

# The session's local cloud (tests/integration/conftest.py): one instance, 4 slots, jobs capped at 40 s.
MAX_JOB_RUNTIME_SECONDS = 40
SLOTS = 4


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_backlog_longer_than_the_cap_never_fails_a_job_for_waiting(local_cloud):
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 60, "every instance stopped")
    # GIVEN one more 24 s job than the instance has slots: whatever the batching, some slot runs two of them,
    # so the last job finishes 48 s or more after the first started, past the 40 s cap
    s3 = local_cloud.client("s3")
    job_ids = []
    for n in range(SLOTS + 1):
        key = f"backlog/hold-{n}.json"
        body = json.dumps({"workload": "hold", "seconds": 24}).encode()
        response = s3.put_object(Bucket=local_cloud.input_bucket, Key=key, Body=body)
        job_ids.append(job_id_for(local_cloud.input_bucket, key, response.get("VersionId") or response.get("ETag")))
    # WHEN they run
    manifests = [local_cloud.wait_for_manifest(job_id, timeout=240) for job_id in job_ids]
    # THEN none failed for the time it waited
    assert [m["status"] for m in manifests] == ["succeeded"] * len(job_ids), [m["error"] for m in manifests]
    # AND the backlog did outlast the cap, the wait shown as queued (slot_wait_s) in the manifests
    starts = [parse(m["timings"]["started_at"]) + timedelta(seconds=m["timings"]["slot_wait_s"]) for m in manifests]
    ends = [parse(m["timings"]["finished_at"]) for m in manifests]
    assert (max(ends) - min(starts)).total_seconds() > MAX_JOB_RUNTIME_SECONDS
    assert max(m["timings"]["slot_wait_s"] for m in manifests) >= 20
    # AND each job's own run counted from its start, under the cap, as the job table recorded it
    for job_id, end in zip(job_ids, ends, strict=True):
        item = local_cloud.wait_until(
            lambda job_id=job_id: (local_cloud.job(job_id) or {}).get("status") == "SUCCEEDED" and local_cloud.job(job_id),
            60, f"{job_id} recorded as SUCCEEDED",
        )
        assert (end - parse(item["running_since"])).total_seconds() < MAX_JOB_RUNTIME_SECONDS
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 60, "every instance stopped")
