"""manifest.json: the one document that ends every job, read by the stop function and clients."""

from __future__ import annotations

import json
import re
from datetime import datetime

from botocore.exceptions import ClientError

from batchworker.errors import RejectedEvent
from batchworker.models import Job, isoformat, manifest_key, utc_now

MAX_MANIFEST_BYTES = 1024 * 1024
MANIFEST_KEY_PATTERN = re.compile(r"^jobs/(j-[0-9a-f]{16})/manifest\.json$")
JOB_ID_PATTERN = re.compile(r"^j-[0-9a-f]{16}$")
# If-None-Match on an existing key. (A 409 ConditionalRequestConflict, two writes in flight, is raised: the
# caller's retry then meets the winner's manifest.)
MANIFEST_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})


def failed_manifest(job: Job, error: str, instance_id: str | None, now: datetime | None = None) -> dict:
    """The manifest the control plane writes when the job never got to write its own."""
    stamp = isoformat(now or utc_now())
    manifest = {
        "job_id": job.job_id,
        "status": "failed",
        "input": {"bucket": job.input_bucket, "key": job.input_key, "version_id": job.input_version},
        "outputs": [],
        "error": error,
        "timings": {"started_at": None, "finished_at": stamp},
        "items": 0,
        "instance_id": instance_id,
        "written_by": "control-plane",
    }
    if job.package:
        manifest["package"] = dict(job.package)
        manifest["params"] = dict(job.params or {})
    return manifest


def write_manifest(s3_client, bucket: str, manifest: dict) -> str | None:
    """Write the job's manifest unless it has one: the first final word stands (S3 conditional write).

    Returns the key, or None when a manifest was already there (the job, or another control-plane step, ended
    the job first); the job table then follows that manifest (batchworker.control.finish_job).
    """
    key = manifest_key(manifest["job_id"])
    try:
        s3_client.put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
            IfNoneMatch="*",
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in MANIFEST_EXISTS_CODES:
            return None
        raise
    return key


def read_manifest(s3_client, bucket: str, key: str) -> dict:
    """Fetch and check a manifest; its job id must match the key it was written under."""
    match = MANIFEST_KEY_PATTERN.match(key)
    if not match:
        raise RejectedEvent(f"{key!r} is not a job manifest key (jobs/<job_id>/manifest.json)")
    try:
        response = s3_client.get_object(Bucket=bucket, Key=key)
    except s3_client.exceptions.NoSuchKey as exc:
        raise RejectedEvent(f"manifest {key!r} does not exist (an event for an object since removed)") from exc
    if response.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
        raise RejectedEvent(f"manifest {key!r} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(response["Body"].read(MAX_MANIFEST_BYTES + 1))
    except ValueError as exc:
        raise RejectedEvent(f"manifest {key!r} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("job_id") != match.group(1):
        raise RejectedEvent(f"manifest {key!r} names another job than its key")
    if manifest.get("status") not in ("succeeded", "failed"):
        raise RejectedEvent(f"manifest {key!r} has status {manifest.get('status')!r}")
    return manifest
