"""Jobs, start to finish: the job package's run (worker/package_run.py), then job.log and, always, the manifest.

A batch runs its jobs one after another in one process, sharing one concurrency slot, the warm handler
processes and one lease heartbeat. The exit code says whether a failure is worth retrying
(worker.errors.ExitCode). Output order under output.prefix: the package's results, job.log, manifest.json last.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from worker.connectivity import check as check_connectivity
from worker.connectivity import unreachable_message
from worker.deadman import RUN_DONE_NAME, push_deadman
from worker.errors import ExitCode, Interrupted, JobError, StorageError
from worker.hosts import HostPool
from worker.joblog import flush_handlers, job_logging
from worker.lease import Heartbeat, note_instance_problem
from worker.lease import make_client as make_lease_client
from worker.manifest import MANIFEST_NAME, JobStatus, Timings, build_manifest, utc_now
from worker.package_run import PackageReport
from worker.paths import job_dir_for
from worker.runtime_cap import RuntimeCap, wait_to_be_killed
from worker.slots import Slot, acquire_slot
from worker.spec import JobSpec, Lease
from worker.storage import AlreadyWritten, Storage

INSTANCE_ID_ENV = "BATCHWORKER_INSTANCE_ID"
LOG_NAME = "job.log"
NETWORK_CHECK_WAIT_SECONDS = 20.0  # the check's three connects time out after 5 s each


@dataclass
class _Outcome:
    status: JobStatus = JobStatus.FAILED
    exit_code: ExitCode = ExitCode.FAILED
    error: str | None = None
    items: int = 0
    outputs: list[str] = field(default_factory=list)
    input_version_id: str | None = None


def run_job(spec: JobSpec, job_root: Path, storage: Storage | None = None) -> ExitCode:
    """Run the job in <job_root>/<job_id>/ and return its exit code; the manifest is uploaded if S3 allows."""
    return run_jobs([spec], job_root, storage)[0]


@dataclass
class WarmState:
    """What a `run` process keeps from one batch to the next (a warm server, worker/server.py)."""

    storage: Storage | None = None
    hosts: HostPool = field(default_factory=HostPool)  # job packages' warm handler processes
    interrupted: Interrupted | None = None  # set: the next batch's jobs fail at once as interrupted


def run_jobs(
    specs: list[JobSpec],
    job_root: Path,
    storage: Storage | None = None,
    warm: WarmState | None = None,
    heartbeat: Heartbeat | None = None,
    waiting_since: tuple[dt.datetime, float] | None = None,
) -> list[ExitCode]:
    """Run the jobs one after another; each writes its own outputs and manifest. Exit codes in spec order.

    From the first job's start (or earlier, by the given `heartbeat`), the leases of every job not
    finished yet are renewed, so jobs waiting their turn stay alive in the jobs table. After SIGTERM the
    jobs still to come fail at once as interrupted. `warm` carries the warm handler processes and the S3
    client over to the next batch. `waiting_since` (UTC, monotonic): when a warm server took the batch to run after
    its current one (default: now). Every job's timings start there: the wait for the slot, and behind the
    batch's earlier jobs, counts as slot_wait_s, and only the job's own run counts toward the runtime cap.
    """
    leases = {spec.job_id: spec.lease for spec in specs if spec.lease}
    batch = _Batch(job_root, heartbeat or Heartbeat(leases), leases)
    if warm is not None:
        batch.interrupted, batch.hosts = warm.interrupted, warm.hosts
        storage = storage or warm.storage
    arrived = waiting_since or (utc_now(), time.monotonic())
    codes: list[ExitCode] = []
    try:
        for spec in specs:
            job_dir = job_dir_for(job_root, spec.job_id)
            job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            job: _Job | None = None
            try:
                with job_logging(spec.job_id, job_dir / LOG_NAME) as logger:
                    behind = "the earlier jobs of its batch" if codes else "the warm server's queue"
                    job = _Job(spec, batch, job_dir, storage, logger, arrived, behind if codes or waiting_since else "")
                    codes.append(job.run())
            except Interrupted as exc:  # SIGTERM outside the job's own error handling (its last uploads)
                batch.interrupted = exc
                codes.append(ExitCode.TRANSIENT)
            if job is not None:
                storage = job.storage  # one S3 client for the batch
            _mark_done(job_dir)
    finally:
        batch.close()
        if warm is not None:
            warm.storage = storage
        else:
            batch.hosts.close()  # nobody keeps them warm for a next batch
    return codes


def _mark_done(job_dir: Path) -> None:
    """run.done = this pid: the dead-man no longer counts this process for the job (worker/deadman.py)."""
    try:
        tmp = job_dir / f".{RUN_DONE_NAME}.tmp"
        tmp.write_text(f"{os.getpid()}\n", encoding="utf-8")
        os.replace(tmp, job_dir / RUN_DONE_NAME)
    except OSError:  # a full disk: the process still counts as running until it exits
        pass


class _Batch:
    """What the jobs of one `run` process share."""

    def __init__(self, job_root: Path, heartbeat: Heartbeat, leases: dict[str, Lease] | None = None) -> None:
        self.job_root = job_root
        self.heartbeat = heartbeat
        self.leases = leases or {}  # every job of the batch with a row to write to
        self.slot: Slot | None = None
        self.hosts = HostPool()
        self.interrupted: Interrupted | None = None
        self.current: _Job | None = None  # the job running now (a lapsed lease stops it)
        self.network: dict | None = None  # the network check's results, once per batch
        self._network_check: threading.Thread | None = None
        heartbeat.on_lapse = self.lease_lapsed

    def check_network(self, log: logging.Logger) -> None:
        """Once per batch, beside its first job (it must not delay it): say which of S3, DynamoDB and SSM the
        instance cannot reach, in that job's log and on the batch's job rows (`batchworker status` shows it:
        without S3 the job can write neither its log nor its manifest)."""
        if self.network is not None:
            return
        self.network = {}

        def check() -> None:
            self.network = check_connectivity()
            problem = unreachable_message(self.network)
            if problem:
                log.error("network check: " + problem, extra={"network": self.network})
                if self.network.get("dynamodb", {}).get("reachable"):
                    self._note_problem(problem, log)
            else:
                log.info("network check: S3, DynamoDB and SSM reachable", extra={"network": self.network})

        self._network_check = threading.Thread(target=check, name="network-check", daemon=True)
        self._network_check.start()

    def _note_problem(self, problem: str, log: logging.Logger) -> None:
        try:
            client = make_lease_client(boto3.session.Session())  # this thread's own session
            for job_id, lease in self.leases.items():
                note_instance_problem(client, job_id, lease, problem)
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not record the network problem on the job rows", extra={"error": str(exc)})

    def lease_lapsed(self, job_id: str, error: str, lease_seconds: float) -> None:
        """No renewal went through for a whole lease: the control plane no longer sees the job. Stop it cleanly."""
        job = self.current
        if job is None or job.cap is None:
            return
        network = unreachable_message(check_connectivity(("dynamodb",)))
        job.cap.stop_now(
            f"the job could not renew its lease in the jobs table for {lease_seconds:.0f}s ({error})"
            + (f"; {network}" if network else "")
            + "; it stopped itself rather than run unobserved. Upload the file again once the instance reaches "
            "DynamoDB"
        )

    def hold_slot(self, count: int) -> Slot | None:
        """Take one of `count` slots for the rest of the batch; None when the batch holds one already."""
        if self.slot is not None:
            return None
        self.slot = acquire_slot(self.job_root, count)
        return self.slot

    def close(self) -> None:
        self.heartbeat.stop()
        if self._network_check is not None:
            # A job that failed at once (no route to S3) must not take the check's verdict with it.
            self._network_check.join(NETWORK_CHECK_WAIT_SECONDS)
        if self.slot is not None:
            self.slot.release()


class _Job:
    def __init__(
        self, spec: JobSpec, batch: _Batch, job_dir: Path, storage: Storage | None, logger: logging.Logger,
        waiting_since: tuple[dt.datetime, float] | None = None, waited_in: str = "",
    ) -> None:
        self.spec = spec
        self.batch = batch
        self.job_root = batch.job_root
        self.job_dir = job_dir
        self.storage = storage
        self.log = logger
        self.timings = Timings.since(*waiting_since) if waiting_since else Timings()
        self.queued_seconds = time.monotonic() - waiting_since[1] if waiting_since else 0.0
        self.waited_in = waited_in  # where it waited before its turn, for the log ("": it did not)
        self.outcome = _Outcome(input_version_id=spec.input_version_id)
        self.device = "unknown"
        self.instance_id = spec.instance_id or os.environ.get(INSTANCE_ID_ENV) or None
        self.cap: RuntimeCap | None = None
        self.package_report = PackageReport()

    def run(self) -> ExitCode:
        self.log.info(
            "job started",
            extra={
                "input_bucket": self.spec.input_bucket,
                "input_key": self.spec.input_key,
                "package": self.spec.package.name,
                "package_version": self.spec.package.version,
                "instance_id": self.instance_id,
            },
        )
        self._push_deadman()
        self.batch.heartbeat.start()  # with the first job: its log records the first renewals
        # The guard ends the job on the instance: at its runtime cap (armed once its code starts, in
        # _hold_slot) or, at any time, when its lease can no longer be renewed (_Batch.lease_lapsed).
        self.cap = RuntimeCap(self.spec.max_runtime_seconds, self._write_stopped_manifest)
        self.batch.current = self
        try:
            if self.batch.interrupted is not None:
                raise self.batch.interrupted
            self.batch.check_network(self.log)
            self._run_package()
            self.outcome.status, self.outcome.exit_code = JobStatus.SUCCEEDED, ExitCode.SUCCEEDED
        except JobError as exc:
            if isinstance(exc, Interrupted):
                self.batch.interrupted = exc
            self.outcome.error, self.outcome.exit_code = str(exc), exc.exit_code
            self.log.error("job failed", extra={"error": str(exc), "transient": exc.transient})
        except Exception as exc:  # a bug or an environment problem: still say so in a manifest
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                self.outcome.error = "the instance ran out of disk space; retry later or use a smaller input"
                self.outcome.exit_code = ExitCode.TRANSIENT
            else:
                self.outcome.error = (
                    f"internal error in the job ({type(exc).__name__}); see {self.spec.output_key(LOG_NAME)} "
                    "for details and report it if it persists"
                )
                self.outcome.exit_code = ExitCode.FAILED
            self.log.exception("job failed with an unexpected error")
        try:
            return self._finish()
        finally:
            self._push_deadman()

    def _hold_slot(self) -> None:
        spec = self.spec
        self.timings.seconds["slot_wait_s"] += self.queued_seconds
        if self.waited_in:
            self.log.info(f"waited in {self.waited_in}", extra={"waited_s": round(self.queued_seconds, 3)})
        with self.timings.measure("slot_wait_s"):
            slot = self.batch.hold_slot(spec.max_concurrent_jobs)
        if slot is not None:
            self.log.info(
                "slot acquired",
                extra={
                    "slot": slot.index,
                    "max_concurrent_jobs": spec.max_concurrent_jobs,
                    "waited_s": round(slot.waited_seconds, 3),
                },
            )
        # Waiting is not running: the job's runtime, and its cap, count from here.
        self.batch.heartbeat.job_started(spec.job_id)
        if self.cap is not None:
            self.cap.arm()  # a timer only when the spec has max_runtime_seconds

    def _run_package(self) -> None:
        """A job package's job (worker/package_run.py); its report goes into the manifest."""
        from worker.package_run import run_package_job

        self._hold_slot()
        if self.storage is None:
            self.storage = Storage()
        job_id = self.spec.job_id
        run_package_job(
            self.spec, self.job_root, self.job_dir, self.storage, self.batch.hosts, self.log, self.timings,
            self.package_report, lambda done, total: self.batch.heartbeat.set_progress(job_id, done, total),
        )
        self.outcome.items = self.package_report.items_total

    def _write_stopped_manifest(self, error: str) -> None:
        """On the guard's thread: the failed manifest of a job stopped on the instance (past its cap, or its
        lease could not be renewed)."""
        spec = self.spec
        self.batch.heartbeat.finish(spec.job_id)
        self.log.error("job stopped on the instance", extra={"error": error})
        flush_handlers()
        storage = self.storage or Storage()
        outputs = []
        try:
            storage.upload_file(self.job_dir / LOG_NAME, spec.output_bucket, spec.output_key(LOG_NAME),
                                "application/x-ndjson")
            outputs.append(spec.output_key(LOG_NAME))
        except (StorageError, OSError) as exc:
            self.log.warning("job.log upload failed", extra={"error": str(exc)})
        self.timings.finish()
        manifest = build_manifest(
            spec, status=JobStatus.FAILED, outputs=outputs, error=error, timings=self.timings, items=0,
            device=self.device, input_version_id=self.outcome.input_version_id, instance_id=self.instance_id,
        )
        try:
            storage.put_json(spec.output_bucket, spec.output_key(MANIFEST_NAME), manifest, only_if_absent=True)
        except AlreadyWritten:
            self.log.warning("the job already had a manifest (the control plane ended it); not replaced")

    def _finish(self) -> ExitCode:
        spec, outcome = self.spec, self.outcome
        if self.cap is not None and not self.cap.settle():
            wait_to_be_killed()  # the cap fired: its failed manifest is the job's last word
        self.batch.heartbeat.finish(spec.job_id)  # the manifest ends the job for the control plane
        self.log.info(
            "uploading job.log and manifest",
            extra={"status": outcome.status.value, "exit_code": int(outcome.exit_code)},
        )
        flush_handlers()
        report = self.package_report
        outcome.outputs[:0] = report.outputs
        outcome.items, self.device = report.items_total, report.device
        outcome.input_version_id = outcome.input_version_id or report.input_version_id
        for path in report.scratch:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if self.storage is None:
            try:
                self.storage = Storage()
            except StorageError as exc:
                self.log.error("cannot create an S3 client", extra={"error": str(exc)})
        if self.storage is not None:
            try:
                with self.timings.measure("upload_s"):
                    key = spec.output_key(LOG_NAME)
                    log_path = self.job_dir / LOG_NAME
                    self.storage.upload_file(log_path, spec.output_bucket, key, "application/x-ndjson")
                outcome.outputs.append(key)
            except StorageError as exc:
                self.log.warning("job.log upload failed", extra={"error": str(exc)})
        self.timings.finish()
        manifest = build_manifest(
            spec,
            status=outcome.status,
            outputs=outcome.outputs,
            error=outcome.error,
            timings=self.timings,
            items=outcome.items,
            device=self.device,
            input_version_id=outcome.input_version_id,
            instance_id=self.instance_id,
            extra=report.manifest_fields(),
        )
        try:
            _write_local_json(self.job_dir / MANIFEST_NAME, manifest)
        except OSError as exc:  # a full disk must not keep the manifest from S3
            self.log.warning("local manifest copy failed", extra={"error": str(exc)})
        if self.storage is None:
            return ExitCode.TRANSIENT
        try:
            self.storage.put_json(spec.output_bucket, spec.output_key(MANIFEST_NAME), manifest, only_if_absent=True)
        except AlreadyWritten:
            # The control plane ended the job first (past its cap, or given up as lost): its manifest stands,
            # so the job table and the output keep agreeing.
            self.log.warning(
                "the job already has a manifest (the control plane ended it); this run's result is not recorded",
                extra={"status": outcome.status.value},
            )
            return ExitCode.FAILED
        except StorageError as exc:
            self.log.error("manifest upload failed", extra={"error": str(exc), "transient": exc.transient})
            return ExitCode.TRANSIENT
        self.log.info(
            "job finished", extra={"status": outcome.status.value, "exit_code": int(outcome.exit_code)}
        )
        return outcome.exit_code

    def _push_deadman(self) -> None:
        try:
            push_deadman(self.job_root, self.spec.idle_shutdown_seconds)
        except OSError as exc:  # a full disk must not fail the job; the control plane stops the instance
            self.log.warning("dead-man timer not pushed", extra={"error": str(exc)})


def _write_local_json(path: Path, document: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
