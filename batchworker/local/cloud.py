"""`batchworker local up | down | env`: the client side of the local cloud's supervisor."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from batchworker.errors import BatchworkerError
from batchworker.local import processes
from batchworker.local.state import LocalOptions, client_environment, is_ready, is_running, read_state


class LocalCloudError(BatchworkerError):
    """The local cloud could not be started, found or stopped."""


def up(local_dir: Path, options: LocalOptions | None = None, timeout_seconds: float = 600.0, progress=None) -> dict:
    """Start the local cloud in the background (default options unless given); its state once ready."""
    options = options or LocalOptions()
    state = read_state(local_dir)
    if is_ready(state):
        return state
    if state and state.get("status") == "stopped":
        _wait_exited(state, 30.0)  # `down` from elsewhere: its supervisor is past shutdown, finishing its exit
    if is_running(state):
        raise LocalCloudError(f"a local cloud is still {state.get('phase')} in {local_dir}; run `batchworker local down`")
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / "state.json").unlink(missing_ok=True)
    cloud_id = uuid.uuid4().hex
    env = {**os.environ, processes.CLOUD_MARKER: cloud_id}
    log_path = local_dir / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "batchworker.local.supervisor", "--local-dir", str(local_dir),
             "--options", options.to_json()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # survives the terminal that ran `local up`
        )
    deadline, last_phase = time.monotonic() + timeout_seconds, None
    while time.monotonic() < deadline:
        state = read_state(local_dir) or {}
        if state.get("phase") != last_phase and progress:
            last_phase = state.get("phase")
            if last_phase:
                progress(last_phase)
        if state.get("status") == "ready":
            return state
        if state.get("status") == "failed" or supervisor.poll() is not None:
            supervisor.wait(timeout=60)
            raise LocalCloudError(
                f"local cloud failed to start: {state.get('error', 'supervisor exited')}; see {log_path}"
            )
        time.sleep(0.2)
    down(local_dir)
    raise LocalCloudError(f"local cloud not ready within {timeout_seconds:.0f}s; see {log_path}")


def down(local_dir: Path, timeout_seconds: float = 60.0) -> bool:
    """Stop the supervisor and everything it started. False when nothing was running."""
    state = read_state(local_dir)
    if not state:
        return False
    pid, cloud_id = state.get("pid"), state.get("cloud_id")
    was_running = is_running(state)
    if was_running:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _wait_exited(state, timeout_seconds)
    if cloud_id:
        processes.kill_marked(cloud_id)  # whatever the supervisor could not stop, detached jobs included
    return was_running


def _wait_exited(state: dict, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and is_running(state):
        time.sleep(0.1)


def environment(local_dir: Path) -> dict[str, str]:
    state = read_state(local_dir)
    if not is_ready(state):
        raise LocalCloudError("the local cloud is not running; start it with `batchworker local up`")
    return client_environment(state)


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())

