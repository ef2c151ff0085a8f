"""The batches one process runs: `run`'s own, then, as the job root's warm server, those it takes
(worker/server.py: the socket and the queue), until it is idle `linger` seconds or SIGTERM.

`batchworker-job run` (worker/cli.py) and the boot-time pre-warm (worker/prewarm.py) both serve through
a BatchProcess, which owns the process's SIGTERM state. Kept light at import: `launch` imports this module
(batch_linger, record_pid); the runner, boto3, NumPy and PIL are imported only when a batch runs.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from worker.deadman import RUN_PID_NAME
from worker.errors import ExitCode, Interrupted, SpecError, print_error
from worker.hosts import HostPool
from worker.paths import SPEC_NAME, job_dir_for, write_private
from worker.server import Offered, Server, ServerRole
from worker.spec import MAX_BATCH_BYTES, MAX_SPEC_BYTES, JobSpec, is_valid_job_id, parse_spec

if TYPE_CHECKING:  # imported late at run time (see the module docstring)
    from worker.runner import WarmState

INTERRUPTED_MESSAGE = "the job was interrupted ({name}); submit the input again"


class BatchProcess:
    """Runs this process's batches and serves the warm server's; `terminating` once SIGTERM came.

    SIGTERM always sets `terminating`. While a batch runs it also raises Interrupted in the main thread
    (the running job fails at once, transient, and the jobs after it too). While idle (waiting for a
    batch, or prewarm preparing) it only ends the wait: what the server took still runs, failing at once.
    Creating a BatchProcess installs its SIGTERM handler (one per process).
    """

    def __init__(self, job_root: Path, *, idle: bool) -> None:
        self.job_root = job_root
        self.terminating = False
        self._raise_on_sigterm = not idle
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def open_server(self, role: ServerRole | None, hosts: HostPool) -> Server | None:
        """The job root's warm server (with the role launch claimed, else one it claims); None when
        another process has the role."""
        return Server.open(self.job_root, role, lambda batch, busy: self._admit(batch, busy, hosts),
                           self._taken, lambda: self.terminating)

    def run_specs(self, specs: list[JobSpec], warm: WarmState, offered: Offered | None = None) -> ExitCode:
        """Run the jobs; the batch's exit code (TRANSIENT before FAILED before SUCCEEDED)."""
        from worker.runner import run_jobs

        try:
            if offered is None:
                codes = run_jobs(specs, self.job_root, warm=warm)
            else:  # its time in the server's queue counts as waiting for the slot
                codes = run_jobs(specs, self.job_root, warm=warm, heartbeat=offered.context,
                                 waiting_since=(offered.taken_at_utc, offered.taken_at))
        except OSError as exc:  # the job directory itself is unusable: no log, no manifest
            print_error(f"cannot set up the job directory: {exc}")
            return ExitCode.TRANSIENT
        if ExitCode.TRANSIENT in codes:
            return ExitCode.TRANSIENT
        return ExitCode.FAILED if ExitCode.FAILED in codes else ExitCode.SUCCEEDED

    def serve(self, server: Server, linger: float, warm: WarmState) -> None:
        """Run the batches the server takes until it is idle for `linger` seconds or SIGTERM, then close it."""
        try:
            while not self.terminating:
                self._raise_on_sigterm = False  # idle: SIGTERM only ends the wait
                offered = server.next_batch(linger)
                if offered is None:
                    break
                next_linger = self.serve_batch(offered, warm)
                if next_linger is not None:
                    linger = next_linger
        except Interrupted:  # SIGTERM between two batches
            pass
        finally:
            # Taken but not run (SIGTERM, or offered as the linger ran out): nobody else will run them.
            for offered in server.close():
                self.serve_batch(offered, warm)

    def serve_batch(self, offered: Offered, warm: WarmState) -> float | None:
        """A batch the warm server took: run it like `run` does; the linger its specs ask for after it."""
        self._raise_on_sigterm = True
        try:
            if self.terminating:  # SIGTERM came: its jobs fail at once, each with a manifest
                warm.interrupted = Interrupted(INTERRUPTED_MESSAGE.format(name="SIGTERM"))
            try:
                specs = read_run_file(offered.batch_path, self.job_root)
            except (OSError, SpecError) as exc:
                print_error(f"cannot read the job spec {offered.batch_path}: {exc}")
                if offered.context is not None:
                    offered.context.stop()
                return None
            self.run_specs(specs, warm, offered)
            return batch_linger(specs)
        finally:
            self._raise_on_sigterm = False
            close_fds(offered.lock_fds)

    def _admit(self, batch_path: Path, busy: bool, hosts: HostPool) -> bool:
        """Idle: take any batch. Busy: only one that would wait for the instance's only slot anyway, or
        whose jobs all run a job package this process has warm (one process per package version: its
        setup() is not run again elsewhere)."""
        try:
            specs = read_run_file(batch_path, self.job_root)
        except (OSError, SpecError):
            return not busy  # idle: take it anyway, its run reports the problem
        admitted = (
            not busy
            or all(hosts.has_package(spec.package.version) for spec in specs)
            or all(spec.max_concurrent_jobs == 1 for spec in specs)
        )
        if admitted:
            hosts.expect(spec.package.version for spec in specs)
        return admitted

    def _taken(self, offered: Offered) -> None:
        """A batch this process took: its jobs' run.pid name this process (before launch hears of it), and
        their leases are renewed from now on, while the batch waits its turn (worker/lease.py)."""
        from worker.lease import Heartbeat, shared_client  # not at the top: `launch` stays free of boto3

        specs = read_run_file(offered.batch_path, self.job_root)
        record_pid(specs, self.job_root, os.getpid())
        leases = {spec.job_id: spec.lease for spec in specs if spec.lease}
        if leases:
            heartbeat = Heartbeat(leases, client=shared_client())
            heartbeat.start()
            offered.context = heartbeat

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.terminating = True
        if self._raise_on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the failed manifest go out
            raise Interrupted(INTERRUPTED_MESSAGE.format(name=signal.Signals(signum).name))


def read_run_file(path: Path, job_root: Path) -> list[JobSpec]:
    """The specs of a spec.json, or of every job a batch file names (read from their job directories)."""
    with path.open("rb") as fh:
        data = fh.read(MAX_BATCH_BYTES + 1)
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"not valid JSON: {exc}") from exc
    if not (isinstance(raw, dict) and "jobs" in raw):
        return [parse_spec(data)]
    job_ids = raw["jobs"]
    if not isinstance(job_ids, list) or not job_ids or not all(is_valid_job_id(j) for j in job_ids):
        raise SpecError('a batch file must be {"jobs": [job_id, ...]}')
    specs = []
    for job_id in job_ids:
        with (job_dir_for(job_root, job_id) / SPEC_NAME).open("rb") as fh:
            specs.append(parse_spec(fh.read(MAX_SPEC_BYTES + 1)))
    return specs


def batch_linger(specs: list[JobSpec]) -> float:
    """How long the batch's process serves after it (0: no warm server): the longest any spec asks for."""
    return max(spec.server_linger_seconds for spec in specs)


def record_pid(specs: list[JobSpec], job_root: Path, pid: int) -> None:
    """The process running the jobs, in each job's run.pid (launch answers with it; deadman reads it)."""
    for spec in specs:
        write_private(job_dir_for(job_root, spec.job_id) / RUN_PID_NAME, f"{pid}\n")


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
