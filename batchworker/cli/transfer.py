"""Uploads of inputs and downloads of a job's results."""

from __future__ import annotations

import json
from pathlib import Path

from batchworker.cli.client import Deployment
from batchworker.errors import BatchworkerError
from batchworker.models import job_id_for, manifest_key, output_prefix


class ResultsNotFound(BatchworkerError):
    """The job has written nothing (yet) under its output prefix."""


def upload(deployment: Deployment, path: Path, key: str, metadata: dict[str, str] | None = None) -> str:
    """Upload one file (with S3 user `metadata`, e.g. param-<name>); return the job id the trigger will give it."""
    s3 = deployment.client("s3")
    with open(path, "rb") as body:
        response = s3.put_object(Bucket=deployment.input_bucket, Key=key, Body=body, Metadata=metadata or {})
    return job_id_for(deployment.input_bucket, key, response.get("VersionId") or response.get("ETag"))


def download_results(deployment: Deployment, job_id: str, out_dir: Path) -> list[Path]:
    s3 = deployment.client("s3")
    target = out_dir / job_id
    written = []
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=deployment.output_bucket, Prefix=output_prefix(job_id)
    ):
        for obj in page.get("Contents", []):
            path = local_path(target, obj["Key"][len(output_prefix(job_id)):])
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(deployment.output_bucket, obj["Key"], str(path))
            written.append(path)
    if not written:
        raise ResultsNotFound(f"job {job_id} has no results yet; check `batchworker status {job_id}`")
    return written


def local_path(target: Path, name: str) -> Path | None:
    """Where output `name` (e.g. `outputs/a/b.png`) goes under `target`; None for a name that would leave it.

    Output keys come from the job's code: every part must be a plain name, never `..`, `.`, empty or absolute.
    """
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") or "\\" in part or "\x00" in part for part in parts):
        return None
    return target.joinpath(*parts)


def read_manifest(deployment: Deployment, job_id: str) -> dict | None:
    s3 = deployment.client("s3")
    try:
        body = s3.get_object(Bucket=deployment.output_bucket, Key=manifest_key(job_id))["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def read_job_log(deployment: Deployment, job_id: str) -> str | None:
    s3 = deployment.client("s3")
    try:
        return s3.get_object(Bucket=deployment.output_bucket, Key=output_prefix(job_id) + "job.log")["Body"].read().decode(
            errors="replace"
        )
    except s3.exceptions.NoSuchKey:
        return None
