"""`batchworker-job`: `launch` (spec or batch on stdin -> a warm server or one detached run, one JSON line
out), `run PATH` and `deadman` (exit 0 when the instance should power itself off).

Results go to stdout as JSON, diagnostics to stderr. `launch` never imports torch, so it answers fast.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from worker.deadman import (
    RUN_DONE_NAME,
    RUN_PID_NAME,
    push_deadman,
    read_deadman,
    running_job_pids,
    should_power_off,
    uptime_seconds,
)
from worker.errors import ExitCode, SpecError, print_error
from worker.hosts import HostPool
from worker.paths import RUN_LOCK_NAME, SPEC_NAME, job_dir_for, job_root_from_env, write_private
from worker.prune import prune_job_root
from worker.server import BATCHES_DIR, ServerRole, claim_role, hand_over
from worker.serving import BatchProcess, batch_linger, close_fds, read_run_file, record_pid
from worker.spec import MAX_BATCH_BYTES, JobSpec, parse_launch_request

RUN_LOG_NAME = "run.log"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchworker-job", description="The batchworker job on the GPU instance."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "launch",
        help='read a job spec, or {"jobs": [spec, ...]}, (JSON) from stdin, start one detached run for '
        "them, print the pid",
    )
    run_parser = commands.add_parser(
        "run", help="run the job of a spec.json, or the jobs of a batch file, in the foreground"
    )
    run_parser.add_argument("spec_path", type=Path, help="a job's spec.json or a batch file from launch")
    run_parser.add_argument("--lock-fds", default="", help=argparse.SUPPRESS)  # from launch: run.lock fds
    run_parser.add_argument("--server-fds", default="", help=argparse.SUPPRESS)  # from launch: ServerRole
    commands.add_parser("prewarm", add_help=False,
                        help="at boot: the warm server, the default job set up already (worker/prewarm.py)")
    commands.add_parser(
        "deadman",
        help='print "expired" and exit 0 when the dead-man timer ran out and no job runs; else "alive", 1',
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prewarm"]:  # its options are its own
        from worker.prewarm import main as prewarm_main

        return prewarm_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "launch":
        return int(launch(sys.stdin.buffer, job_root_from_env()))
    if args.command == "deadman":
        return deadman(job_root_from_env())
    server_fds = _parse_fds(args.server_fds)
    role = ServerRole(*server_fds) if len(server_fds) == 2 else None
    return int(run(args.spec_path, _parse_fds(args.lock_fds), role))


def launch(stdin: BinaryIO, job_root: Path) -> ExitCode:
    """Validate the spec(s), store them under the job root and hand them to a warm server
    (worker/server.py), or else start one `run` in its own session.

    One spec prints {"job_id", "pid"}; a batch prints {"jobs": [{"job_id", "pid"}, ...]} in input order,
    and its jobs run one after another in one process (pid: the warm server's when it took them). A job
    whose run is still going is not started again: its entry is {"job_id", "pid" (the running one),
    "already_running": true}.
    """
    try:
        specs, is_batch = parse_launch_request(stdin.read(MAX_BATCH_BYTES + 1))
    except SpecError as exc:
        print_error(str(exc))
        return ExitCode.FAILED
    replies: list[dict] = []
    locks: dict[str, int] = {}  # job_id -> fd holding its run.lock, for the jobs this launch starts
    try:
        push_deadman(job_root, max(spec.idle_shutdown_seconds for spec in specs))  # a job is on its way
        for spec in specs:
            reply, lock_fd = _claim(spec, job_root)
            replies.append(reply)
            if lock_fd is not None:
                locks[spec.job_id] = lock_fd
        if locks:
            pid = _start([spec for spec in specs if spec.job_id in locks], job_root, locks)
            for reply in replies:
                if reply["job_id"] in locks:
                    reply["pid"] = pid
    except OSError as exc:
        print_error(f"cannot start the job: {exc}")
        return ExitCode.TRANSIENT
    finally:
        for lock_fd in locks.values():
            os.close(lock_fd)
    print(json.dumps({"jobs": replies} if is_batch else replies[0]), flush=True)
    try:
        prune_job_root(job_root)  # at most hourly; after the answer, which the caller already has
    except OSError as exc:
        print_error(f"pruning old job directories failed: {exc}")
    return ExitCode.SUCCEEDED


def _claim(spec: JobSpec, job_root: Path) -> tuple[dict, int | None]:
    """Take the job's run.lock and write its spec.json; (reply, lock fd), or (already_running reply, None)."""
    job_dir = job_dir_for(job_root, spec.job_id)
    job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(job_dir / RUN_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        running_pid = _read_pid(job_dir / RUN_PID_NAME)
        return {"job_id": spec.job_id, "pid": running_pid, "already_running": True}, None
    try:
        (job_dir / RUN_DONE_NAME).unlink(missing_ok=True)  # from an earlier attempt: this one is not done
        write_private(job_dir / SPEC_NAME, json.dumps(spec.to_json(), indent=2) + "\n")
    except OSError:
        os.close(lock_fd)
        raise
    return {"job_id": spec.job_id, "pid": None}, lock_fd


def _start(specs: list[JobSpec], job_root: Path, locks: dict[str, int]) -> int:
    """Run the claimed jobs (their locks pass on): on a warm server if one takes them, else a new `run`."""
    batches = job_root / BATCHES_DIR
    batches.mkdir(parents=True, exist_ok=True, mode=0o700)
    batch_path = batches / f"{specs[0].job_id}.json"
    write_private(batch_path, json.dumps({"jobs": [spec.job_id for spec in specs]}) + "\n")
    lock_fds = [locks[spec.job_id] for spec in specs]
    if batch_linger(specs) > 0:
        pid = hand_over(job_root, batch_path, lock_fds,
                        lambda: _read_pid(job_dir_for(job_root, specs[0].job_id) / RUN_PID_NAME))
        if pid is not None:
            return pid
    return _start_run(specs, job_root, batch_path, lock_fds)


def _start_run(specs: list[JobSpec], job_root: Path, batch_path: Path, lock_fds: list[int]) -> int:
    """Start `run` detached for the claimed jobs (their locks pass to it) and record its pid per job.

    When no process serves the job root, the new `run` gets the server role (worker/server.py) with it.
    """
    first_dir = job_dir_for(job_root, specs[0].job_id)
    command = [sys.executable, "-m", "worker.cli", "run", "--lock-fds", ",".join(map(str, lock_fds))]
    role = claim_role(job_root) if batch_linger(specs) > 0 else None
    inherited = list(lock_fds)  # the child inherits the locks and holds them until its batch ends
    if role is not None:
        command += ["--server-fds", f"{role.lock_fd},{role.listener_fd}"]
        inherited += [role.lock_fd, role.listener_fd]
    try:
        with (first_dir / RUN_LOG_NAME).open("ab") as run_log:
            process = subprocess.Popen(  # keys travel in spec.json files, never on a command line
                [*command, str(batch_path)],
                stdin=subprocess.DEVNULL,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                cwd=first_dir,
                start_new_session=True,  # survives the SSH session's hangup
                close_fds=True,
                pass_fds=tuple(inherited),
            )
    finally:
        if role is not None:
            role.close()  # the child holds its own copies
    record_pid(specs, job_root, process.pid)
    return process.pid


def run(path: Path, lock_fds: list[int] | tuple[int, ...] = (), role: ServerRole | None = None) -> ExitCode:
    """Run a job (path: its spec.json) or a batch (path: {"jobs": [job_id, ...]}, each job's spec.json in
    its job directory) in the foreground; the exit code tells the caller whether a retry can help.

    lock_fds (the jobs' run.lock, from launch) are closed when the batch ends. Unless the specs say
    server_linger_seconds 0, the process is the job root's warm server (worker/server.py, worker/serving.py)
    from the start, with the role launch claimed for it or one it claims: it runs the batches it takes after
    its own, then lingers for more until idle that long or SIGTERM.
    """
    job_root = job_root_from_env()
    process = BatchProcess(job_root, idle=False)  # SIGTERM from now on fails the running job at once
    try:
        specs = read_run_file(path, job_root)
    except (OSError, SpecError) as exc:
        close_fds(lock_fds)
        if role is not None:
            role.close()
        print_error(f"cannot read the job spec {path}: {exc}")
        return ExitCode.FAILED
    linger = batch_linger(specs)
    if linger <= 0 and role is not None:
        role.close()
    hosts = HostPool()  # the job packages' warm handler processes, one per (version, environment)
    hosts.expect(spec.package.version for spec in specs)
    server = process.open_server(role, hosts) if linger > 0 else None  # before the slow imports
    from worker.runner import WarmState  # not at the top: `launch` stays free of boto3, NumPy and PIL

    warm = WarmState(hosts=hosts)
    try:
        try:
            code = process.run_specs(specs, warm)
        finally:
            close_fds(lock_fds)
        if linger > 0 and server is None and not process.terminating:
            server = process.open_server(None, hosts)  # the server of the time has gone: be the next one
        if server is not None:
            process.serve(server, linger, warm)
    finally:
        hosts.close()
    return code


def deadman(job_root: Path) -> int:
    """0 ("expired"): power off now (worker/deadman.py says when); 1 ("alive") otherwise."""
    timer, running = read_deadman(job_root), running_job_pids(job_root)
    expired = should_power_off(timer, time.time(), uptime_seconds(), running)
    print("expired" if expired else "alive", flush=True)
    return 0 if expired else 1


def _parse_fds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
