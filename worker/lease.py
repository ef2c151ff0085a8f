"""The job's lease in the jobs table, renewed by a heartbeat thread while the job is alive on the instance.

One Heartbeat serves a whole batch: it renews every job of the batch that has not finished yet (jobs waiting
their turn included, so the control plane does not take them for lost). Waiting is not running: a job stays
DISPATCHED while it waits for a slot or its turn, and becomes RUNNING, with `running_since` (where the runtime
cap counts from), only when its code starts (`Heartbeat.job_started`). The job table's own writer lives in
batchworker/jobs.py, which the instance does not install; the update here must stay compatible with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.spec import Lease

STATUS_DISPATCHED = "DISPATCHED"
STATUS_RUNNING = "RUNNING"
STATUS_SHARDS = 2  # batchworker/jobs.py's; a job's status-index partition is "<status>#<crc32(job id) % 2>"
RENEWALS_PER_LEASE = 3  # renew every lease.seconds / 3: two renewals may fail before the lease lapses
CALLER_TURN_SECONDS = 30.0  # the longest the heartbeat lets finish()/stop() callers go first (a hung call)

logger = logging.getLogger("worker.lease")


def make_client(session: boto3.session.Session | None = None) -> Any:
    """A DynamoDB client (AWS_ENDPOINT_URL locally, the instance profile on AWS), from the default session
    or, outside the main thread, from a session of the caller's own (sessions are not thread-safe)."""
    # One client may serve the heartbeats of every batch a warm server holds: a connection for each.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=10,
                    max_pool_connections=64)
    return (session or boto3).client("dynamodb", config=config)


_shared_client = None


def shared_client() -> Any:
    """One DynamoDB client for the heartbeats of every batch a warm server takes (clients are thread-safe;
    a session and client per batch cost the listener thread a service model load each, under a burst). Made
    from a session of its own: boto3's default one is not thread-safe, and the listener thread may make it."""
    global _shared_client
    if _shared_client is None:
        _shared_client = make_client(boto3.session.Session())
    return _shared_client


def iso_utc(moment: dt.datetime) -> str:
    """2026-11-22T01:02:03.456Z, the job table's timestamp format."""
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_shard(job_id: str, status: str) -> str:
    """The job's partition of the jobs table's status index (batchworker/jobs.py status_shard)."""
    return f"{status}#{zlib.crc32(job_id.encode()) % STATUS_SHARDS}"


def renew_lease(
    client: Any,
    job_id: str,
    lease: Lease,
    now: dt.datetime,
    progress: tuple[int, int] | None = None,
    started: bool | dt.datetime = False,
) -> bool:
    """Hold the job's lease until now + lease.seconds; False when the control plane has already ended it.

    `progress` (items done, items total), when the job knows it, goes to items_done / items_total.
    `started`: the job's code started (True: now; a datetime: then): it becomes RUNNING and its runtime
    counts from then. Otherwise the status and `running_since` are left alone (a job waiting for a slot
    stays DISPATCHED).
    Other errors (throttling, network, a missing table) propagate: the caller logs them and tries again.
    """
    # A plain renewal writes only attributes the status index does not project (lease, progress): it never
    # writes to the index. Starting changes the status, so it moves the job's index entry (once per job).
    sets = ["lease_expires_at = :t"]
    values = {
        ":dispatched": {"S": STATUS_DISPATCHED},
        ":running": {"S": STATUS_RUNNING},
        ":t": {"S": iso_utc(now + dt.timedelta(seconds=lease.seconds))},
    }
    if started is not False:
        since = iso_utc(now if started is True else started)
        sets += ["#s = :running", "status_shard = :shard", "running_since = :since", "updated_at = :since"]
        values[":since"] = {"S": since}
        values[":shard"] = {"S": status_shard(job_id, STATUS_RUNNING)}
    if progress is not None:
        sets += ["items_done = :done", "items_total = :total"]
        values.update({":done": {"N": str(progress[0])}, ":total": {"N": str(progress[1])}})
    try:
        client.update_item(
            TableName=lease.table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET " + ", ".join(sets),
            # Only a job the control plane still expects to run: a SUCCEEDED or FAILED job (finished, or
            # failed by the watchdog when its lease lapsed) must never come back to life.
            ConditionExpression="#s IN (:dispatched, :running)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues=values,
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


def note_instance_problem(client: Any, job_id: str, lease: Lease, problem: str) -> bool:
    """Put what the instance cannot do ("cannot reach S3 (...)") on the job's row, where `batchworker status`
    shows it; False when the job has ended already. Nothing else changes (updated_at stays: it times waits)."""
    try:
        client.update_item(
            TableName=lease.table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET instance_problem = :problem",
            # Only a job still on the instance: a finished job's row is the control plane's.
            ConditionExpression="#s IN (:dispatched, :running)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":problem": {"S": problem[:1000]},
                ":dispatched": {"S": STATUS_DISPATCHED},
                ":running": {"S": STATUS_RUNNING},
            },
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


class Heartbeat:
    """A daemon thread renewing the leases of the given jobs at once and then every min(seconds) / 3.

    job_started(job_id) marks the job RUNNING from now (its code starts): the write goes out at once from the
    heartbeat's thread, so the job's code does not wait for DynamoDB; running_since is the moment of the call.
    finish(job_id) ends a job's renewals (returns after any renewal in flight, and writes a RUNNING still
    pending first, so the row is RUNNING before the manifest can end it); call it before the job's manifest
    goes out. The thread ends when no job is left, or at stop().
    """

    def __init__(self, leases: dict[str, Lease], client: Any = None) -> None:
        self._leases = dict(leases)
        self._client = client
        self._lock = threading.Lock()  # held while renewing, so finish() waits for a renewal in flight
        # Callers of finish()/stop() waiting for the lock: the heartbeat lets them in before its next renewal
        # (threading.Lock is not fair: re-taking it at once, the thread could keep finish() out for a round).
        self._callers = 0
        self._callers_lock = threading.Lock()
        self._no_callers = threading.Event()
        self._no_callers.set()
        self._stopped = threading.Event()
        self._wake = threading.Event()  # a RUNNING write is pending, or stop()
        self._pending_start: dict[str, dt.datetime] = {}  # job_id -> when its code started, not written yet
        self._thread: threading.Thread | None = None
        self._started = False
        self._renewed: set[str] = set()  # jobs whose first renewal was logged
        self._last_ok: dict[str, float] = {}  # job -> monotonic time of its last renewal (or of the start)
        # Called (on a thread of its own) once a job's renewals have failed for a whole lease: the control
        # plane then takes the job for lost, so the job must not go on unobserved (worker/runner.py).
        self.on_lapse: Callable[[str, str, float], None] | None = None
        self._lapsed = False
        self._progress: dict[str, tuple[int, int]] = {}  # job_id -> (items done, items total)
        shortest = min((lease.seconds for lease in leases.values()), default=0.0)
        self.interval_seconds = shortest / RENEWALS_PER_LEASE

    def start(self) -> None:
        """Start renewing (once; later calls do nothing)."""
        if self._started or not self._leases:
            return
        self._started = True
        self._last_ok = dict.fromkeys(self._leases, time.monotonic())
        if self._client is None:
            try:
                self._client = make_client()
            except BotoCoreError as exc:  # no region, say: the job runs; the watchdog will judge it
                logger.error("cannot create a DynamoDB client; no lease heartbeat", extra={"error": str(exc)})
                return
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def set_progress(self, job_id: str, done: int, total: int) -> None:
        """Items done / total, written with the job's next renewal (not a write of its own)."""
        self._progress[job_id] = (done, total)

    def job_started(self, job_id: str) -> None:
        """The job's code starts now: RUNNING from now on. The write is the heartbeat thread's (at once),
        off the job's path; without a running heartbeat it is made here."""
        # Not under the lock: a renewal in flight holds it for as long as DynamoDB takes to answer.
        self._pending_start[job_id] = dt.datetime.now(dt.timezone.utc)
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                self._write_pending(job_id)
            return
        self._wake.set()

    def finish(self, job_id: str) -> None:
        with self._caller_turn():
            self._write_pending(job_id)  # RUNNING (and running_since) before the manifest ends the job
            self._leases.pop(job_id, None)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        self._wake.set()
        with self._caller_turn():
            self._leases.clear()
            self._pending_start.clear()
        if self._thread is not None:
            self._thread.join(timeout)

    def _beat(self) -> None:
        """Renew each job every interval_seconds counted from the start of its previous renewal, the most
        overdue first. A round over many jobs with slow calls (a warm server holding a burst of one package's
        batches, on a loaded host) must not stretch every job's period by the round's length: with a pause
        after each round, periods of 2 s pause + 2 s round came within 2 s of a 6 s lease."""
        due: dict[str, float] = {}  # job_id -> monotonic time its next renewal is due
        while not self._stopped.is_set():
            self._wake.clear()
            for job_id in list(self._pending_start):  # RUNNING writes first: a job's code has started
                with self._lock:
                    self._write_pending(job_id)
            with self._lock:
                jobs = sorted(self._leases.items(), key=lambda job: due.get(job[0], 0.0))
            if not jobs:
                return
            for job_id, lease in jobs:
                if self._stopped.is_set() or due.get(job_id, 0.0) > time.monotonic():
                    continue
                due[job_id] = time.monotonic() + self.interval_seconds
                self._no_callers.wait(CALLER_TURN_SECONDS)  # a finish() waiting goes first
                with self._lock:  # held per renewal: finish() waits for this one call at most
                    if job_id in self._leases:
                        self._renew(job_id, lease)
            with self._lock:
                next_due = min((due.get(job_id, 0.0) for job_id in self._leases), default=0.0)
            self._wake.wait(max(0.0, next_due - time.monotonic()))

    @contextlib.contextmanager
    def _caller_turn(self) -> Iterator[None]:
        """The lock for finish()/stop(), ahead of the heartbeat's next renewal."""
        with self._callers_lock:
            self._callers += 1
            self._no_callers.clear()
        try:
            with self._lock:
                yield
        finally:
            with self._callers_lock:
                self._callers -= 1
                if not self._callers:
                    self._no_callers.set()

    def _write_pending(self, job_id: str) -> None:
        """The RUNNING write of a job whose code started (lock held); kept pending while it fails."""
        started = self._pending_start.get(job_id)
        lease = self._leases.get(job_id)
        if started is None or lease is None or self._client is None:
            self._pending_start.pop(job_id, None)
            return
        if self._renew(job_id, lease, started=started):
            self._pending_start.pop(job_id, None)

    def _renew(self, job_id: str, lease: Lease, started: bool | dt.datetime = False) -> bool:
        """One renewal; True when the write was answered (renewed, or the job ended by the control plane)."""
        try:
            renewed = renew_lease(self._client, job_id, lease, dt.datetime.now(dt.timezone.utc),
                                  self._progress.get(job_id), started)
        except (BotoCoreError, ClientError) as exc:
            logger.warning("lease renewal failed; trying again", extra={"job_id": job_id, "error": str(exc)})
            since = time.monotonic() - self._last_ok.get(job_id, time.monotonic())
            if since >= lease.seconds and self.on_lapse is not None and not self._lapsed:
                self._lapsed = True
                threading.Thread(target=self.on_lapse, args=(job_id, f"{type(exc).__name__}: {exc}", lease.seconds),
                                 name="lease-lapsed", daemon=True).start()
            return False
        self._last_ok[job_id] = time.monotonic()
        if not renewed:
            logger.warning(
                "the job is no longer DISPATCHED or RUNNING in the jobs table (the control plane ended it); "
                "lease heartbeat stopped",
                extra={"job_id": job_id, "table": lease.table},
            )
            del self._leases[job_id]
            self._pending_start.pop(job_id, None)
        elif started is not False:
            logger.info("the job is RUNNING in the jobs table", extra={"job_id": job_id, "table": lease.table})
        elif job_id not in self._renewed:
            self._renewed.add(job_id)
            every = round(self.interval_seconds, 3)
            logger.info(
                "lease taken: the job is alive in the jobs table",
                extra={"job_id": job_id, "table": lease.table, "renew_every_s": every},
            )
        return True
