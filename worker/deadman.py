"""The instance's dead-man timer: it powers itself off when no job has started or ended for a while.

Every `launch` and every job start and end writes <job_root>/.deadman = {"expires_at": <unix time>,
"idle_shutdown_seconds": S} with expires_at = now + S (the spec's idle_shutdown_seconds). A systemd timer
on AWS (the instance host locally) powers the instance off when should_power_off() says so. This is defence
in depth under the control plane's own stop: it holds even if every Lambda is broken.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

DEADMAN_NAME = ".deadman"
RUN_PID_NAME = "run.pid"  # written by `launch` in every job directory it starts a run for
RUN_DONE_NAME = "run.done"  # the pid of the run that finished the job; launch removes it when it claims
MAX_DEADMAN_BYTES = 4096


@dataclass(frozen=True)
class Deadman:
    expires_at: float  # unix time
    idle_shutdown_seconds: float | None


def push_deadman(job_root: Path, idle_shutdown_seconds: float, now: float | None = None) -> None:
    """Move the timer to now + idle_shutdown_seconds (the last writer wins)."""
    moment = time.time() if now is None else now
    document = {"expires_at": moment + idle_shutdown_seconds, "idle_shutdown_seconds": idle_shutdown_seconds}
    job_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = job_root / f".{DEADMAN_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(document) + "\n", encoding="utf-8")
    os.replace(tmp, job_root / DEADMAN_NAME)


def read_deadman(job_root: Path) -> Deadman | None:
    """The timer, or None when there is none (or it is unreadable: then nobody powers off on its word)."""
    try:
        with (job_root / DEADMAN_NAME).open("rb") as fh:
            raw = json.loads(fh.read(MAX_DEADMAN_BYTES))
        expires_at = float(raw["expires_at"])
        idle = raw.get("idle_shutdown_seconds")
        idle = float(idle) if idle is not None else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not math.isfinite(expires_at):
        return None
    return Deadman(expires_at, idle)


def should_power_off(
    deadman: Deadman | None, now: float, uptime_seconds: float | None, running_pids: list[int]
) -> bool:
    """True only when every one of these holds; each one alone keeps the instance up:

    - there is a timer (no job ever ran here: the control plane decides);
    - it has expired (a job started or ended less than idle_shutdown_seconds ago);
    - no job process is alive (a long job pushes the timer only at its start and end);
    - the instance has been up for idle_shutdown_seconds (a timer left from before the last stop does not
      count against a fresh boot, whose job is still on its way over SSH).
    """
    if deadman is None or now < deadman.expires_at or running_pids:
        return False
    if uptime_seconds is not None and deadman.idle_shutdown_seconds is not None:
        return uptime_seconds >= deadman.idle_shutdown_seconds
    return True


def running_job_pids(job_root: Path) -> list[int]:
    """Pids from <job_root>/*/run.pid that are live `worker.cli` processes (a job, or a batch of them).

    A job whose run.done names the same pid has finished: the process may live on as an idle warm server
    (worker/server.py), which must not keep the instance up.
    """
    pids: set[int] = set()
    for pid_file in job_root.glob(f"j-*/{RUN_PID_NAME}"):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if _read_pid(pid_file.with_name(RUN_DONE_NAME)) == pid:
            continue
        if _is_job_process(pid):
            pids.add(pid)
    return sorted(pids)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def uptime_seconds() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_job_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # cannot tell: keep the instance up
        return True
    return b"worker.cli" in cmdline  # a zombie's cmdline is empty: dead
