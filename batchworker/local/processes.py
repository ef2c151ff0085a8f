"""Child processes of the local cloud: start, wait for a ready file, and stop without leaving any behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CLOUD_MARKER = "BATCHWORKER_LOCAL_CLOUD_ID"


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def wait_for_file(path: Path, process: subprocess.Popen, timeout_seconds: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # written but not complete yet
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready within {timeout_seconds:.0f}s")


def terminate(processes: list[subprocess.Popen], grace_seconds: float = 10.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def processes_marked(cloud_id: str) -> list[int]:
    """Pids of every process whose environment carries this local cloud's marker (detached jobs too)."""
    needle = f"{CLOUD_MARKER}={cloud_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked(cloud_id: str, timeout_seconds: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process of this local cloud still alive."""
    pids = processes_marked(cloud_id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_seconds / 2
        while time.monotonic() < deadline and (pids := [p for p in pids if is_running(p)]):
            time.sleep(0.1)
        if not pids:
            break
    return pids


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (init may reap late: `os.kill(pid, 0)` succeeds on a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def carries_marker(pid: int, cloud_id: str) -> bool:
    """Whether the process belongs to this local cloud (a pid in an old state file may have been reused)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # gone, or exiting
        return False
    except PermissionError:
        return True  # another user's process: cannot tell, assume it is the cloud's
    return f"{CLOUD_MARKER}={cloud_id}".encode() in environ.split(b"\0")
