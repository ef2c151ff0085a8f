"""`batchworker-job`: `launch` (spec on stdin -> detached run, one JSON line out) and `run SPEC_PATH`.

Results go to stdout as JSON, diagnostics to stderr. `launch` never imports torch, so it answers fast.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from worker.errors import ExitCode, Interrupted, SpecError
from worker.runner import job_dir_for, job_root_from_env
from worker.spec import MAX_SPEC_BYTES, parse_spec

SPEC_NAME = "spec.json"
RUN_LOG_NAME = "run.log"
RUN_LOCK_NAME = "run.lock"  # held (flock) by the running `run` process for its whole life
RUN_PID_NAME = "run.pid"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchworker-job", description="The batchworker job on the GPU instance."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "launch", help="read a job spec (JSON) from stdin, start the job detached, print its pid"
    )
    run_parser = commands.add_parser("run", help="run the job described by SPEC_PATH in the foreground")
    run_parser.add_argument("spec_path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "launch":
        return int(launch(sys.stdin.buffer, job_root_from_env()))
    return int(run(args.spec_path))


def launch(stdin: BinaryIO, job_root: Path) -> ExitCode:
    """Validate the spec, store it under the job root and start `run` in its own session.

    Launching a job whose run is still going starts nothing and reports the running pid.
    """
    try:
        spec = parse_spec(stdin.read(MAX_SPEC_BYTES + 1))
    except SpecError as exc:
        _print_error(str(exc))
        return ExitCode.FAILED
    job_dir = job_dir_for(job_root, spec.job_id)
    try:
        job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(job_dir / RUN_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        _print_error(f"cannot create the job directory {job_dir}: {exc}")
        return ExitCode.TRANSIENT
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(job_dir / RUN_PID_NAME)
            print(json.dumps({"job_id": spec.job_id, "pid": pid, "already_running": True}), flush=True)
            return ExitCode.SUCCEEDED
        spec_path = job_dir / SPEC_NAME
        _write_private(spec_path, json.dumps(spec.to_json(), indent=2) + "\n")
        with (job_dir / RUN_LOG_NAME).open("ab") as run_log:
            process = subprocess.Popen(  # the key travels in spec.json, never on a command line
                [sys.executable, "-m", "worker.cli", "run", str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                cwd=job_dir,
                start_new_session=True,  # survives the SSH session's hangup
                close_fds=True,
                pass_fds=(lock_fd,),  # the child inherits the lock and holds it until it exits
            )
        _write_private(job_dir / RUN_PID_NAME, f"{process.pid}\n")
    except OSError as exc:
        _print_error(f"cannot start the job: {exc}")
        return ExitCode.TRANSIENT
    finally:
        os.close(lock_fd)
    print(json.dumps({"job_id": spec.job_id, "pid": process.pid}), flush=True)
    return ExitCode.SUCCEEDED


def run(spec_path: Path) -> ExitCode:
    """Run one job in the foreground; the exit code tells the caller whether a retry can help."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with spec_path.open("rb") as fh:
            spec = parse_spec(fh.read(MAX_SPEC_BYTES + 1))
    except (OSError, SpecError) as exc:
        _print_error(f"cannot read the job spec {spec_path}: {exc}")
        return ExitCode.FAILED
    from worker.runner import run_job

    try:
        return run_job(spec, job_root_from_env())
    except OSError as exc:  # the job directory itself is unusable: no log, no manifest
        _print_error(f"cannot set up the job directory: {exc}")
        return ExitCode.TRANSIENT


def _raise_interrupted(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the failed manifest go out
    raise Interrupted(f"the job was interrupted ({signal.Signals(signum).name}); submit the input again")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _print_error(message: str) -> None:
    print(json.dumps({"error": message}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
