"""S3 I/O for the job: bounded downloads, uploads, and S3 errors translated into JobErrors."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import InputError, StorageError, printable

CHUNK_BYTES = 1024 * 1024
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})  # If-None-Match: * on a key that exists
_PERMANENT_CODES = (
    _MISSING_CODES | _DENIED_CODES | _EXISTS_CODES | frozenset({"InvalidObjectState", "InvalidArgument"})
)


class AlreadyWritten(StorageError):
    """A write-once object (the manifest) was already there: the first writer's word stands."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


@dataclass(frozen=True)
class ObjectInfo:
    size_bytes: int
    etag: str
    version_id: str | None


def make_client() -> Any:
    """An S3 client; AWS_ENDPOINT_URL (local) or the instance profile (AWS) from the environment."""
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    try:
        return boto3.client("s3", config=config)
    except BotoCoreError as exc:
        message = f"cannot create an S3 client ({exc}); check AWS_DEFAULT_REGION"
        raise StorageError(message, transient=True) from exc


def describe(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{printable(key)}"


class Storage:
    """The few S3 calls the job makes; the client is injected so tests can hand in their own."""

    def __init__(self, client: Any = None) -> None:
        self._s3 = client if client is not None else make_client()

    def head(self, bucket: str, key: str) -> ObjectInfo:
        with translate_errors("read", bucket, key):
            response = self._s3.head_object(Bucket=bucket, Key=key)
        return ObjectInfo(response["ContentLength"], response.get("ETag", ""), response.get("VersionId"))

    def download(
        self,
        bucket: str,
        key: str,
        dest: Path,
        *,
        version_id: str | None = None,
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        """Stream an object to dest (via a temporary file); InputError if it is larger than max_bytes."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        with translate_errors("read", bucket, key):
            response = self._s3.get_object(**kwargs)
            size = response["ContentLength"]
            if max_bytes is not None and size > max_bytes:
                response["Body"].close()
                raise InputError(_too_large(size, max_bytes))
            written = 0
            try:
                with tmp.open("wb") as fh:
                    for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                        written += len(chunk)
                        if max_bytes is not None and written > max_bytes:
                            raise InputError(_too_large(written, max_bytes))
                        fh.write(chunk)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return ObjectInfo(written, response.get("ETag", ""), response.get("VersionId"))

    def get_optional(self, bucket: str, key: str, max_bytes: int) -> bytes | None:
        """A small object's bytes, or None when it is missing or unreadable (S3 answers 403 for both)."""
        try:
            with translate_errors("read", bucket, key):
                response = self._s3.get_object(Bucket=bucket, Key=key)
                if response["ContentLength"] > max_bytes:
                    response["Body"].close()
                    return None
                return response["Body"].read()
        except StorageError as exc:
            if exc.transient:
                raise
            return None

    def upload_file(self, path: Path, bucket: str, key: str, content_type: str) -> None:
        with translate_errors("write", bucket, key), path.open("rb") as body:
            self._s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)

    def put_json(self, bucket: str, key: str, document: dict[str, Any], *, only_if_absent: bool = False) -> None:
        """Upload a JSON document; with only_if_absent, AlreadyWritten when the key exists (written once)."""
        body = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        condition = {"IfNoneMatch": "*"} if only_if_absent else {}
        try:
            with translate_errors("write", bucket, key):
                self._s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition)
        except StorageError as exc:
            if only_if_absent and _error_code(exc.__cause__) in _EXISTS_CODES:
                raise AlreadyWritten(f"{describe(bucket, key)} already exists; it was not replaced") from exc
            raise


@contextlib.contextmanager
def translate_errors(action: str, bucket: str, key: str) -> Iterator[None]:
    """Turn botocore errors into StorageError: missing/denied objects are permanent, the rest transient."""
    where = describe(bucket, key)
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        if code in _MISSING_CODES:
            raise StorageError(f"{where} does not exist (S3 {code})", transient=False) from exc
        if code in _DENIED_CODES and action == "read":
            # The instance role may not list the input bucket (it would see every client's keys), so S3
            # answers a missing object with 403 too: say both.
            raise StorageError(
                f"{where} does not exist, or the instance role may not read it (S3 {code}); check the key, "
                "and that the instance role has s3:GetObject on it",
                transient=False,
            ) from exc
        if code in _DENIED_CODES:
            raise StorageError(
                f"access denied to {action} {where} (S3 {code}); check that the instance role has "
                "s3:PutObject on it",
                transient=False,
            ) from exc
        raise StorageError(
            f"S3 error {code} on {action} {where}: {error.get('Message', '')}".rstrip(": "),
            transient=code not in _PERMANENT_CODES,
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(
            f"could not {action} {where}: {type(exc).__name__}: {exc}; S3 unreachable, retry later",
            transient=True,
        ) from exc
    except (ConnectionError, TimeoutError) as exc:
        message = f"could not {action} {where}: {type(exc).__name__}; retry later"
        raise StorageError(message, transient=True) from exc


def _error_code(exc: BaseException | None) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def _too_large(size_bytes: int, max_bytes: int) -> str:
    return (
        f"input is {size_bytes / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB. "
        "Split it into smaller files and upload them separately"
    )
