"""One job of a job package: package, environment, input items, the handler's warm process, per-item results.

Called by worker/runner.py for a spec with a `package`; the runner keeps what every job has (slot, lease,
job.log, manifest last). Output under the job's prefix: results.csv, errors.jsonl, outputs/<name>...
The job succeeds when the share of failed items is at most the package's max_failed_ratio.
"""

from __future__ import annotations

import datetime as dt
import logging
import mimetypes
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.environments import Environment, ensure_environment
from worker.errors import InputError, Interrupted, JobError, printable
from worker.hosts import HANDLER_LOG_NAME, HandlerHost, HostKey, HostPool, SetupFailed
from worker.items import expand_items
from worker.manifest import Timings
from worker.packages import Package, fetch_package
from worker.spec import JobSpec, PackageRef
from worker.storage import Storage

ENVS_DIR = ".envs"
RESULTS_NAME = "results.csv"
ERRORS_NAME = "errors.jsonl"
OUTPUTS_DIR = "outputs"
MAX_INPUT_BYTES = 100 * 1024 * 1024
UPLOAD_THREADS = 8  # botocore keeps 10 connections per client


class ItemsFailed(JobError):
    """More items failed than the package's max_failed_ratio allows."""


@dataclass
class PackageReport:
    """What the manifest says about a package job; filled in as the job goes, read even when it fails."""

    package: dict[str, str] | None = None
    environment: dict[str, Any] | None = None
    items_total: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    results_rows: int = 0
    device: str = "unknown"
    handler_pid: int | None = None
    input_version_id: str | None = None  # the S3 version downloaded (the event may not have named one)
    setup_called: bool = False  # this job started the handler's process (setup() ran for it)
    process_started_at: str | None = None
    outputs: list[str] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # removed after the job (input, zip members)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "environment": self.environment,
            "items_succeeded": self.items_succeeded,
            "items_failed": self.items_failed,
            "results_rows": self.results_rows,
            "handler": {"pid": self.handler_pid, "setup_called": self.setup_called,
                        "process_started_at": self.process_started_at},
        }


def matched_extension(key: str, accept: tuple[str, ...]) -> str:
    """The entry of `accept` the key's name ends with (longest first); InputError naming them otherwise."""
    name = key.rsplit("/", 1)[-1].lower()
    for ext in sorted(accept, key=len, reverse=True):
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise InputError(
        f"{printable(key.rsplit('/', 1)[-1] or key, 120)} is not a file type this job accepts; "
        f"upload one of: {', '.join(accept)}"
    )


def run_package_job(
    spec: JobSpec,
    job_root: Path,
    job_dir: Path,
    storage: Storage,
    hosts: HostPool,
    log: logging.Logger,
    timings: Timings,
    report: PackageReport,
    on_progress: Callable[[int, int], None],
    package: Package | None = None,
) -> None:
    """Run the job; raises a JobError (the manifest's error) when it fails. `package`: already unpacked
    (`batchworker job run` hands in the local folder), else fetched by the spec's package ref."""
    report.package = spec.package.to_json()
    if package is None:
        with timings.measure("package_s"):
            package = fetch_package(spec.package, job_root, storage)
    config = package.config
    log.info("package ready", extra={"package": spec.package.name, "version": spec.package.version,
                                     "cache_hit": package.cache_hit})
    ext = matched_extension(spec.input_key, config.accept)
    params = _resolve_params(config, spec.params)
    with timings.measure("environment_s"):
        environment = _environment(package, job_root, log)
    report.environment = environment.to_json()
    input_path = job_dir / f"input{ext}"
    report.scratch += [input_path, job_dir / "items"]
    with timings.measure("download_s"):
        info = storage.download(spec.input_bucket, spec.input_key, input_path,
                                version_id=spec.input_version_id, max_bytes=MAX_INPUT_BYTES)
    report.input_version_id = info.version_id
    log.info("input downloaded", extra={"bytes": info.size_bytes, "version_id": info.version_id})
    items = expand_items(input_path, printable(spec.input_key.rsplit("/", 1)[-1] or spec.input_key, 120),
                         job_dir / "items")
    report.items_total = len(items)
    on_progress(0, len(items))
    with timings.measure("model_load_s"):
        host = _warm_host(hosts, package, environment, job_root, log, report)
    report.device, report.handler_pid = host.device, host.pid
    output_dir = job_dir / OUTPUTS_DIR
    shutil.rmtree(output_dir, ignore_errors=True)  # a retried job starts clean
    output_dir.mkdir(parents=True)
    request = {
        "job_id": spec.job_id,
        "items": [item.to_json() for item in items],
        "params": params,
        "output_dir": str(output_dir),
        "results_path": str(job_dir / RESULTS_NAME),
        "errors_path": str(job_dir / ERRORS_NAME),
    }
    key = HostKey(spec.package.version, environment.key)
    try:
        result = host.run_job(request, lambda level, message: _handler_log(log, level, message), on_progress,
                              lambda at: setattr(report, "process_started_at", _iso(at)))
    except Interrupted:
        hosts.discard(key)  # mid-job: its state is unknown
        raise
    except JobError:
        hosts.discard(key)
        raise
    # As the handler's process measured them: process() to its last row, then the writing of the results
    timings.seconds["inference_s"] += result.process_s
    timings.seconds["results_s"] = timings.seconds.get("results_s", 0.0) + result.results_s
    counts = result.counts
    on_progress(counts["total"], counts["total"])
    report.items_succeeded, report.items_failed = counts["succeeded"], counts["failed"]
    report.results_rows = counts.get("rows", 0)
    log.info("process done", extra={**counts, "process_s": result.process_s})
    with timings.measure("upload_s"):
        _upload_results(spec, job_dir, output_dir, storage, report)
    total, failed = counts["total"], counts["failed"]
    ratio = config.max_failed_ratio
    if total and failed / total > ratio:
        first = result.first_error or {}
        detail = f"; first: {first.get('item')}: {first.get('type')}: {first.get('message')}" if first else ""
        what = result.process_error or f"{failed} of {total} items failed"
        raise ItemsFailed(
            f"{what} (the package allows a failed share of {ratio:g}){detail}. "
            f"Every failed item is in {spec.output_key(ERRORS_NAME)}"
        )


def _iso(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _resolve_params(config: Any, raw: dict[str, Any]) -> dict[str, Any]:
    from batchworker.jobpkg import JobPackageError

    try:
        return config.resolve_params(raw)
    except JobPackageError as exc:
        raise InputError(f"bad parameter: {exc}") from exc


def _environment(package: Package, job_root: Path, log: logging.Logger) -> Environment:
    requirements = ""
    if package.config.requirements:
        requirements = (package.directory / package.config.requirements).read_text(encoding="utf-8")
    return ensure_environment(job_root / ENVS_DIR, requirements, log)


def _warm_host(hosts: HostPool, package: Package, environment: Environment, job_root: Path,
               log: logging.Logger, report: PackageReport) -> HandlerHost:
    """This package's warm handler process; started (setup() called) when there is none yet."""
    key = HostKey(package.ref.version, environment.key)
    host = hosts.get(key)
    if host is not None:
        log.info("handler warm: setup() already done", extra={"handler_pid": host.pid})
        return host
    host = HandlerHost(environment.python, package.directory, package.config.entrypoint,
                       job_root / HANDLER_LOG_NAME)
    try:
        host.wait_ready(lambda level, message: _handler_log(log, level, message))
    except (SetupFailed, Interrupted):
        host.kill()
        raise
    report.setup_called = True
    hosts.add(key, host)
    log.info("handler setup() done", extra={"setup_s": host.setup_s, "device": host.device,
                                             "handler_pid": host.pid})
    return host


def _handler_log(log: logging.Logger, level: str, message: str) -> None:
    log.log(logging.getLevelName(level) if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            else logging.INFO, "handler: %s", message, extra={"source": "handler"})


def _upload_results(spec: JobSpec, job_dir: Path, output_dir: Path, storage: Storage,
                    report: PackageReport) -> None:
    """results.csv, errors.jsonl and every output file, UPLOAD_THREADS at a time (each PUT is a round trip;
    a package that writes a file per item has many). The manifest lists them in this order."""
    uploads = [(job_dir / RESULTS_NAME, spec.output_key(RESULTS_NAME), "text/csv"),
               (job_dir / ERRORS_NAME, spec.output_key(ERRORS_NAME), "application/x-ndjson")]
    for path in sorted(_regular_files(output_dir)):
        relative = path.relative_to(output_dir).as_posix()
        content_type = mimetypes.guess_type(relative)[0] or "application/octet-stream"
        uploads.append((path, spec.output_key(f"{OUTPUTS_DIR}/{relative}"), content_type))
    with ThreadPoolExecutor(max_workers=min(UPLOAD_THREADS, len(uploads)), thread_name_prefix="upload") as pool:
        futures = [pool.submit(storage.upload_file, path, spec.output_bucket, key, content_type)
                   for path, key, content_type in uploads]
    failures = [future.exception() for future in futures]
    report.outputs += [key for (_, key, _), failure in zip(uploads, failures, strict=True) if failure is None]
    for failure in failures:
        if failure is not None:
            raise failure  # the first one, in upload order, is the job's error


def _regular_files(root: Path) -> list[Path]:
    """Files under root, never following a symlink (a handler's link to /etc/passwd is not an output)."""
    found = []
    for directory, _, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink() and path.is_file() and not name.endswith(".part"):
                found.append(path)
    return found


def prepare_package(ref: PackageRef, job_root: Path, storage: Storage, hosts: HostPool,
                    log: logging.Logger) -> tuple[HostKey, HandlerHost]:
    """A package's archive, environment and warm handler (setup() done) before any job of it (worker/prewarm.py)."""
    package = fetch_package(ref, job_root, storage)
    environment = _environment(package, job_root, log)
    host = _warm_host(hosts, package, environment, job_root, log, PackageReport())
    return HostKey(ref.version, environment.key), host
