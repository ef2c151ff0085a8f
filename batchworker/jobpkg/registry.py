"""Deployed job packages in the artifacts bucket: immutable versions and one pointer per package name.

    job-packages/<name>/<sha256>.tar.gz   the archive (content-addressed, never overwritten)
    job-packages/<name>/<sha256>.json     its parsed job.toml (JobConfig.to_dict) and archive facts
    job-packages/<name>/current.json      the pointer: current version, its config, when, and earlier versions
    job-packages/<name>/bundled.json      written by Terraform for the default job: the version to use while
                                          no `job deploy` of that name has made a pointer

The pointer is replaced only with a conditional write (If-Match on the ETag read, If-None-Match for the first
deploy), so of two deploys or rollbacks racing on one name exactly one wins and the other is told.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.jobpkg.archive import ARCHIVE_SUFFIX, ArchiveInfo, build_archive
from batchworker.jobpkg.config import NAME_PATTERN, JobConfig, load_job_config
from batchworker.jobpkg.errors import DeployConflict, PackageNotFound
from batchworker.models import isoformat, utc_now

PREFIX = "job-packages/"
POINTER_NAME = "current.json"
BUNDLED_NAME = "bundled.json"
MAX_HISTORY = 50  # earlier versions kept in the pointer, for rollback
MAX_POINTER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PackageRef:
    """The deployed version of a package: what a job is pinned to when the trigger accepts it."""

    name: str
    version: str  # sha256 of the archive
    uri: str  # s3://<artifacts>/job-packages/<name>/<version>.tar.gz
    deployed_at: str  # "" for a bundled version
    config: JobConfig
    source: str = "deploy"  # "deploy", "rollback" or "bundled" (Terraform's, no pointer yet)

    def to_spec(self) -> dict:
        """The job spec's `package` field."""
        return {"name": self.name, "version": self.version, "uri": self.uri}


@dataclass(frozen=True)
class DeployResult:
    ref: PackageRef
    previous_version: str | None
    changed: bool  # False when that very version was already current
    archive: ArchiveInfo | None = None


class PackageRegistry:
    """Deploy, read, list and roll back packages in `bucket` (the artifacts bucket)."""

    def __init__(self, bucket: str, s3_client=None, prefix: str = PREFIX):
        self.bucket = bucket
        self.s3 = s3_client or boto3.client("s3")
        self.prefix = prefix

    def archive_key(self, name: str, version: str) -> str:
        return f"{self.prefix}{name}/{version}{ARCHIVE_SUFFIX}"

    def config_key(self, name: str, version: str) -> str:
        return f"{self.prefix}{name}/{version}.json"

    def pointer_key(self, name: str) -> str:
        return f"{self.prefix}{name}/{POINTER_NAME}"

    def bundled_key(self, name: str) -> str:
        return f"{self.prefix}{name}/{BUNDLED_NAME}"

    def archive_uri(self, name: str, version: str) -> str:
        return f"s3://{self.bucket}/{self.archive_key(name, version)}"

    def deploy(self, package_dir: Path, now: datetime | None = None) -> DeployResult:
        """Check the package, upload its archive and config, make it current. An invalid package uploads nothing."""
        config = load_job_config(Path(package_dir))  # raises InvalidJobConfig before any upload
        with tempfile.TemporaryDirectory(prefix="batchworker-deploy-") as work:
            archive = build_archive(Path(package_dir), Path(work))
            return self.publish(config, archive, now)

    def publish(self, config: JobConfig, archive: ArchiveInfo, now: datetime | None = None) -> DeployResult:
        """Upload a built archive (once per version) and point `config.name` at it."""
        name, version = config.name, archive.sha256
        if not self._exists(self.archive_key(name, version)):
            self.s3.upload_file(
                str(archive.path), self.bucket, self.archive_key(name, version),
                ExtraArgs={"ContentType": "application/gzip"},
            )
        self._put_json(self.config_key(name, version), version_record(config, archive), if_none_match=True)
        pointer, etag = self._read_pointer(name)
        result = self._move_pointer(name, version, config, now, "deploy", pointer, etag)
        return DeployResult(result.ref, result.previous_version, result.changed, archive)

    def current(self, name: str) -> PackageRef | None:
        """The current version of `name`, or None when no such package is deployed."""
        if not NAME_PATTERN.match(name):
            return None
        pointer, _ = self._read_pointer(name)
        if pointer:
            return self._ref(pointer)
        return self._bundled(name)

    def require(self, name: str) -> PackageRef:
        ref = self.current(name)
        if ref is None:
            raise PackageNotFound(f"no job package {name!r} is deployed; deploy it with `batchworker job deploy PATH`")
        return ref

    def names(self) -> list[str]:
        """Names that have a deployed package."""
        found = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                found.append(common["Prefix"][len(self.prefix):].rstrip("/"))
        return sorted(name for name in found if NAME_PATTERN.match(name))

    def list(self) -> list[PackageRef]:
        return [ref for ref in (self.current(name) for name in self.names()) if ref is not None]

    def history(self, name: str) -> list[dict]:
        """Earlier versions of `name`, newest first: each {"version", "deployed_at"}."""
        pointer, _ = self._read_pointer(name)
        return list(reversed(pointer.get("history", []))) if pointer else []

    def read_config(self, name: str, version: str) -> JobConfig:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.config_key(name, version))["Body"].read()
        except ClientError as exc:
            if aws.error_code(exc) in ("NoSuchKey", "404"):
                raise PackageNotFound(f"job package {name!r} has no version {version[:12]}") from exc
            raise
        return JobConfig.from_dict(json.loads(body)["config"], origin=f"{name} version {version[:12]}")

    def rollback(self, name: str, now: datetime | None = None) -> DeployResult:
        """Make the version before the current one current again (once per earlier deploy)."""
        pointer, etag = self._read_pointer(name)
        if not pointer:
            raise PackageNotFound(f"no job package {name!r} was deployed with `job deploy`; nothing to roll back")
        if pointer.get("history"):
            previous = pointer["history"][-1]["version"]
        else:
            # Before the first `job deploy` of the default job there was Terraform's bundled version.
            bundled = self._bundled(name)
            if bundled is None or bundled.version == pointer["version"]:
                raise PackageNotFound(
                    f"job package {name!r} has no version before {pointer['version'][:12]}; nothing to roll back to"
                )
            previous = bundled.version
        config = self.read_config(name, previous)
        return self._move_pointer(name, previous, config, now, "rollback", pointer, etag)

    def _move_pointer(self, name, version, config, now, action, pointer: dict | None, etag: str | None) -> DeployResult:
        """Replace the pointer read as (`pointer`, `etag`); DeployConflict when it changed since that read."""
        current = self._ref(pointer) if pointer else self._bundled(name)
        previous = current.version if current else None
        if previous == version and action == "deploy":
            return DeployResult(current, previous, changed=False)
        history = list(pointer.get("history", [])) if pointer else []
        if action == "rollback":
            if history:  # else it returns to the bundled version, which is no entry of the history
                history.pop()
        elif pointer:
            history.append({"version": previous, "deployed_at": pointer["deployed_at"]})
        new = {
            "name": name,
            "version": version,
            "uri": self.archive_uri(name, version),
            "deployed_at": isoformat(now or utc_now()),
            "action": action,
            "config": config.to_dict(),
            "history": history[-MAX_HISTORY:],
        }
        try:
            self._put_json(self.pointer_key(name), new, if_match=etag, if_none_match=etag is None)
        except ClientError as exc:
            if aws.error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                latest = self.current(name)
                raise DeployConflict(
                    f"another deploy or rollback of {name!r} happened at the same moment"
                    + (f" (current version is now {latest.version[:12]})" if latest else "")
                    + f"; nothing changed by this {action}: check `batchworker job list` and run it again"
                ) from exc
            raise
        return DeployResult(self._ref(new), previous, changed=True)

    def _read_pointer(self, name: str) -> tuple[dict | None, str | None]:
        return self._read_json(self.pointer_key(name))

    def _bundled(self, name: str) -> PackageRef | None:
        bundled, _ = self._read_json(self.bundled_key(name))
        if not bundled:
            return None
        return PackageRef(
            name=name,
            version=bundled["version"],
            uri=self.archive_uri(name, bundled["version"]),
            deployed_at="",
            config=JobConfig.from_dict(bundled["config"], origin=f"{name} bundled version {bundled['version'][:12]}"),
            source="bundled",
        )

    def _read_json(self, key: str) -> tuple[dict | None, str | None]:
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if aws.error_code(exc) in ("NoSuchKey", "404"):
                return None, None
            raise
        return json.loads(response["Body"].read(MAX_POINTER_BYTES)), response["ETag"]

    def _put_json(self, key: str, data: dict, if_match: str | None = None, if_none_match: bool = False) -> None:
        conditions = {}
        if if_match:
            conditions["IfMatch"] = if_match
        elif if_none_match:
            conditions["IfNoneMatch"] = "*"
        try:
            self.s3.put_object(
                Bucket=self.bucket, Key=key, Body=dumps(data),
                ContentType="application/json", **conditions,
            )
        except ClientError as exc:
            # A content-addressed record that already exists holds the same content: nothing to do.
            if key.endswith(POINTER_NAME) or aws.error_code(exc) not in ("PreconditionFailed", "412"):
                raise

    def _exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if aws.error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise
        return True

    def _ref(self, pointer: dict) -> PackageRef:
        name = pointer["name"]
        return PackageRef(
            name=name,
            version=pointer["version"],
            uri=pointer["uri"],
            deployed_at=pointer["deployed_at"],
            config=JobConfig.from_dict(pointer["config"], origin=f"{name} version {pointer['version'][:12]}"),
            source=pointer.get("action", "deploy"),
        )


def version_record(config: JobConfig, archive: ArchiveInfo) -> dict:
    """What `<sha256>.json` holds beside each archive."""
    return {"config": config.to_dict(), "archive": {"size_bytes": archive.size_bytes, "files": len(archive.files)}}


def bundled_record(config: JobConfig, archive: ArchiveInfo) -> dict:
    """What Terraform puts at `bundled.json` for the default job (scripts/bundle_default_job.py builds it)."""
    return {"name": config.name, "version": archive.sha256, "config": config.to_dict()}


def dumps(data: dict) -> bytes:
    """The one JSON form of registry records: the same record is the same bytes (and S3 ETag)."""
    return json.dumps(data, indent=2, sort_keys=True).encode()
