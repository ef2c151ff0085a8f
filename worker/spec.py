"""The job spec: parse and validate the JSON the dispatcher sends (docs/architecture.md, "Job spec").

`launch` takes one spec object, or a batch `{"jobs": [spec, ...]}` (parse_launch_request).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from worker.errors import SpecError

MAX_SPEC_BYTES = 64 * 1024
MAX_BATCH_BYTES = 1024 * 1024
MAX_BATCH_JOBS = 256
MAX_KEY_BYTES = 1024  # S3's own limit on key length (UTF-8 bytes)
JOB_ID_PATTERN = re.compile(r"^j-[0-9a-f]{16}$")
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
TABLE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{3,255}$")  # DynamoDB's rule for table names
DEFAULT_MAX_CONCURRENT_JOBS = 4
MAX_CONCURRENT_JOBS_LIMIT = 64
DEFAULT_IDLE_SHUTDOWN_SECONDS = 600.0
DEFAULT_SERVER_LINGER_SECONDS = 60.0  # a finished `run` waits this long for the next batch (worker/server.py)
MAX_SECONDS = 86_400.0  # upper bound for lease.seconds and idle_shutdown_seconds
MAX_RUNTIME_SECONDS = 172_800.0  # max_job_runtime_seconds' own bound (48 h, the SSM Run Command limit)
PACKAGE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,39}$")  # job.toml's name
PACKAGE_VERSION_PATTERN = re.compile(r"^[0-9a-f]{64}$")  # the archive's sha256
MAX_PARAMS = 64
MAX_PARAM_NAME_CHARS = 64
MAX_PARAM_TEXT_CHARS = 1024


@dataclass(frozen=True)
class Lease:
    """Where the job renews its lease (the jobs table) and for how long each renewal holds."""

    table: str
    seconds: float


@dataclass(frozen=True)
class PackageRef:
    """The job package a job runs: pinned to the version that was current when the job was accepted."""

    name: str
    version: str  # sha256 of the archive, checked after download
    uri: str  # s3://bucket/key of the archive

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "uri": self.uri}


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    input_bucket: str
    input_key: str
    input_version_id: str | None
    output_bucket: str
    output_prefix: str
    package: PackageRef  # the job package the job runs, pinned when the upload was accepted
    instance_id: str | None
    lease: Lease | None = None  # None: no heartbeat
    max_concurrent_jobs: int = DEFAULT_MAX_CONCURRENT_JOBS  # slots per instance (worker/slots.py)
    idle_shutdown_seconds: float = DEFAULT_IDLE_SHUTDOWN_SECONDS  # dead-man push (worker/deadman.py)
    server_linger_seconds: float = DEFAULT_SERVER_LINGER_SECONDS  # warm server after the batch; 0: none
    max_runtime_seconds: float | None = None  # the job is killed past this (worker/runtime_cap.py); None: no cap
    params: dict[str, Any] = field(default_factory=dict)  # checked by the trigger, again by the runner

    def output_key(self, name: str) -> str:
        return self.output_prefix + name

    def to_json(self) -> dict[str, Any]:
        """The wire form (the same shape parse_spec accepts)."""
        return {
            "job_id": self.job_id,
            "input": {
                "bucket": self.input_bucket,
                "key": self.input_key,
                "version_id": self.input_version_id,
            },
            "output": {"bucket": self.output_bucket, "prefix": self.output_prefix},
            "instance_id": self.instance_id,
            "lease": {"table": self.lease.table, "seconds": self.lease.seconds} if self.lease else None,
            "max_concurrent_jobs": self.max_concurrent_jobs,
            "idle_shutdown_seconds": self.idle_shutdown_seconds,
            "server_linger_seconds": self.server_linger_seconds,
            "max_runtime_seconds": self.max_runtime_seconds,
            "package": self.package.to_json(),
            "params": dict(self.params),
        }


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_PATTERN.fullmatch(value) is not None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split s3://bucket/key; raise SpecError if it is not one."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise SpecError(f"expected an s3://bucket/key URI, got {uri!r:.200}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not BUCKET_PATTERN.fullmatch(bucket) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise SpecError(f"expected an s3://bucket/key URI, got {uri!r:.200}")
    return bucket, key


def parse_spec(data: bytes | str) -> JobSpec:
    """Parse the spec JSON (at most MAX_SPEC_BYTES) and validate every field the job uses."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"job spec is larger than {MAX_SPEC_BYTES} bytes")
    return spec_from_object(_load_json(data, "job spec"))


def parse_launch_request(data: bytes) -> tuple[list[JobSpec], bool]:
    """`launch`'s stdin: one spec, or {"jobs": [spec, ...]}. Returns (specs, is_batch).

    A batch is all or nothing: the first invalid spec raises SpecError naming its index and job_id.
    """
    if len(data) > MAX_BATCH_BYTES:
        raise SpecError(f"launch request is larger than {MAX_BATCH_BYTES} bytes")
    raw = _load_json(data, "launch request")
    if "jobs" not in raw:
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(f"job spec is larger than {MAX_SPEC_BYTES} bytes; send a batch for more")
        return [spec_from_object(raw)], False
    jobs = raw["jobs"]
    if set(raw) != {"jobs"} or not isinstance(jobs, list) or not 1 <= len(jobs) <= MAX_BATCH_JOBS:
        raise SpecError(f'a batch must be {{"jobs": [spec, ...]}} with 1 to {MAX_BATCH_JOBS} job specs')
    specs: list[JobSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(jobs):
        named = item.get("job_id") if isinstance(item, dict) else None
        where = f"jobs[{index}] (job_id {named!r:.100})"
        try:
            spec = spec_from_object(item)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}; nothing was started") from exc
        if spec.job_id in seen:
            raise SpecError(f"{where}: the job_id appears twice in the batch; nothing was started")
        seen.add(spec.job_id)
        specs.append(spec)
    return specs, True


def spec_from_object(raw: object) -> JobSpec:
    """Validate one decoded spec object."""
    if not isinstance(raw, dict):
        raise SpecError("job spec must be a JSON object")
    job_id = raw.get("job_id")
    if not is_valid_job_id(job_id):
        raise SpecError(f"job_id must match {JOB_ID_PATTERN.pattern}, got {job_id!r:.100}")
    inp = _require_object(raw, "input")
    out = _require_object(raw, "output")
    input_bucket = _require_bucket(inp, "input.bucket")
    input_key = inp.get("key")
    if not isinstance(input_key, str) or not input_key:
        raise SpecError("input.key must be a non-empty string")
    if len(input_key.encode("utf-8")) > MAX_KEY_BYTES:
        raise SpecError(f"input.key is longer than {MAX_KEY_BYTES} bytes")
    version_id = inp.get("version_id")
    if version_id is not None and (not isinstance(version_id, str) or not 0 < len(version_id) <= 1024):
        raise SpecError("input.version_id must be null or a non-empty string")
    output_bucket = _require_bucket(out, "output.bucket")
    prefix = out.get("prefix")
    if not isinstance(prefix, str) or not prefix or len(prefix.encode("utf-8")) > MAX_KEY_BYTES - 64:
        raise SpecError(f"output.prefix must be a non-empty string of at most {MAX_KEY_BYTES - 64} bytes")
    package = _parse_package(raw.get("package"))
    instance_id = raw.get("instance_id")
    if instance_id is not None and (
        not isinstance(instance_id, str) or not INSTANCE_ID_PATTERN.fullmatch(instance_id)
    ):
        raise SpecError(
            f"instance_id must be null or an instance id like i-0123..., got {instance_id!r:.100}"
        )
    return JobSpec(
        job_id=job_id,
        input_bucket=input_bucket,
        input_key=input_key,
        input_version_id=version_id,
        output_bucket=output_bucket,
        output_prefix=prefix,
        package=package,
        instance_id=instance_id,
        lease=_parse_lease(raw.get("lease")),
        max_concurrent_jobs=_optional_int(
            raw, "max_concurrent_jobs", DEFAULT_MAX_CONCURRENT_JOBS, MAX_CONCURRENT_JOBS_LIMIT
        ),
        idle_shutdown_seconds=_optional_seconds(raw, "idle_shutdown_seconds", DEFAULT_IDLE_SHUTDOWN_SECONDS),
        server_linger_seconds=_optional_linger(raw, "server_linger_seconds", DEFAULT_SERVER_LINGER_SECONDS),
        max_runtime_seconds=(
            _optional_seconds(raw, "max_runtime_seconds", None, limit=MAX_RUNTIME_SECONDS)
            if raw.get("max_runtime_seconds") is not None
            else None
        ),
        params=_parse_params(raw.get("params")),
    )


def _parse_package(value: object) -> PackageRef:
    if not isinstance(value, dict) or set(value) != {"name", "version", "uri"}:
        raise SpecError('package must be {"name": ..., "version": <sha256>, "uri": "s3://..."}: every job runs '
                        "a job package (the control plane pins it when the upload is accepted)")
    name, version, uri = value["name"], value["version"], value["uri"]
    if not isinstance(name, str) or not PACKAGE_NAME_PATTERN.fullmatch(name):
        raise SpecError(f"package.name must match {PACKAGE_NAME_PATTERN.pattern}, got {name!r:.100}")
    if not isinstance(version, str) or not PACKAGE_VERSION_PATTERN.fullmatch(version):
        raise SpecError(f"package.version must be a sha256 (64 lowercase hex), got {version!r:.100}")
    try:
        parse_s3_uri(uri)
    except SpecError:
        raise SpecError(f"package.uri must look like s3://bucket/key, got {uri!r:.200}") from None
    return PackageRef(name, version, uri)


def _parse_params(value: object) -> dict[str, Any]:
    """Parameter values as the trigger resolved them: names to int, float, str or bool."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PARAMS:
        raise SpecError(f"params must be null or an object of at most {MAX_PARAMS} parameters")
    for name, item in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_PARAM_NAME_CHARS:
            raise SpecError(f"params: {name!r:.100} is not a parameter name")
        if not isinstance(item, (int, float, str, bool)) or (isinstance(item, str) and len(item) > MAX_PARAM_TEXT_CHARS):
            raise SpecError(f"params.{name} must be an int, float, bool or a string of at most "
                            f"{MAX_PARAM_TEXT_CHARS} characters")
    return dict(value)


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{what} must be a JSON object")
    return raw


def _parse_lease(value: object) -> Lease | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"table", "seconds"}:
        raise SpecError('lease must be null or {"table": "<jobs table>", "seconds": <lease length>}')
    table = value["table"]
    if not isinstance(table, str) or not TABLE_NAME_PATTERN.fullmatch(table):
        raise SpecError(f"lease.table must be a DynamoDB table name, got {table!r:.100}")
    return Lease(table=table, seconds=_optional_seconds(value, "seconds", None, "lease.seconds"))


def _optional_int(raw: dict[str, Any], name: str, default: int, limit: int) -> int:
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise SpecError(f"{name} must be null or an integer from 1 to {limit}, got {value!r:.100}")
    return value


def _optional_seconds(
    raw: dict[str, Any], name: str, default: float | None, label: str = "", limit: float = MAX_SECONDS
) -> float:
    """raw[name] as seconds in [1, limit]; `default` when absent (required when default is None)."""
    value = raw.get(name)
    if value is None and default is not None:
        return default
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 1 <= value <= limit
    ):
        raise SpecError(
            f"{label or name} must be a number of seconds from 1 to {limit:.0f}, got {value!r:.100}"
        )
    return float(value)


def _optional_linger(raw: dict[str, Any], name: str, default: float) -> float:
    """raw[name] as seconds in [0, MAX_SECONDS] (0 turns the feature off); `default` when absent."""
    value = raw.get(name)
    if value is None:
        return default
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_SECONDS
    ):
        raise SpecError(f"{name} must be a number of seconds from 0 to {MAX_SECONDS:.0f}, got {value!r:.100}")
    return float(value)


def _require_object(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise SpecError(f"{name} must be a JSON object")
    return value


def _require_bucket(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name.split(".")[-1])
    if not isinstance(value, str) or not BUCKET_PATTERN.fullmatch(value):
        raise SpecError(f"{name} must be an S3 bucket name, got {value!r:.100}")
    return value
