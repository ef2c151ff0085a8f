"""The local cloud's one liveness check: a zombie supervisor or a reused pid is not a running cloud."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from batchworker.local import processes
from batchworker.local.state import is_ready, is_running


def spawn(seconds: float, cloud_id: str | None = None) -> subprocess.Popen:
    env = {**os.environ, processes.CLOUD_MARKER: cloud_id} if cloud_id else None
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"], env=env)


def test_a_zombie_supervisor_is_not_running():
    # GIVEN a supervisor that exited but was not reaped yet (its parent has not waited: a zombie)
    child = spawn(0, cloud_id="c1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and processes.is_running(child.pid):
        time.sleep(0.05)
    try:
        os.kill(child.pid, 0)  # the check `local up` used to make: it succeeds on a zombie
        state = {"status": "stopped", "pid": child.pid, "cloud_id": "c1"}
        # THEN neither check calls it alive, so `local up` may start a new cloud at once
        assert not processes.is_running(child.pid)
        assert not is_running(state)
        assert not is_ready({**state, "status": "ready"})
    finally:
        child.wait(timeout=10)


def test_a_live_supervisor_is_running_and_a_reused_pid_is_not():
    ours, stranger = spawn(60, cloud_id="c1"), spawn(60)
    try:
        deadline = time.monotonic() + 30  # the marker is in /proc/<pid>/environ once exec is done
        while time.monotonic() < deadline and not processes.carries_marker(ours.pid, "c1"):
            time.sleep(0.05)
        assert is_running({"pid": ours.pid, "cloud_id": "c1"})
        assert is_ready({"status": "ready", "pid": ours.pid, "cloud_id": "c1"})
        assert not is_ready({"status": "starting", "pid": ours.pid, "cloud_id": "c1"})
        # An old state file whose pid now belongs to another process
        assert not is_running({"pid": stranger.pid, "cloud_id": "c1"})
        assert not is_running({"pid": ours.pid, "cloud_id": "another cloud"})
        assert not is_running(None) and not is_running({"status": "ready"})
    finally:
        for child in (ours, stranger):
            child.kill()
            child.wait(timeout=10)
