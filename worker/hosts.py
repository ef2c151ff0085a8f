"""The runner's side of handler hosts (worker/handler_host.py): one warm process per (package version,
environment), started on first use, setup() run once, reused by every later job of that package that
this `run` process (the warm server) runs. Different packages never share a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import JobError

MAX_EVENT_BYTES = 1024 * 1024
HANDLER_LOG_NAME = "handler.log"  # the handler processes' stderr (prints, crashes), per job root


class SetupFailed(JobError):
    """The handler could not be imported, or its setup() raised: a package problem, not retried."""


class HostDied(JobError):
    """The handler's process ended in the middle of a job (a crash, or killed for memory)."""


@dataclass(frozen=True)
class HostKey:
    package_version: str
    environment_key: str


@dataclass
class JobResult:
    counts: dict[str, int]
    process_error: str | None
    first_error: dict[str, str] | None
    process_s: float  # process() driven to its last row, in the handler's process
    results_s: float = 0.0  # writing results.csv and errors.jsonl


class HandlerHost:
    """One running handler process; run_job() sends it a job and reads its events until "done"."""

    def __init__(self, python: str, package_dir: Path, entrypoint: str, log_path: Path) -> None:
        self.python, self.package_dir, self.entrypoint = python, package_dir, entrypoint
        with log_path.open("ab") as stderr:  # the handler's prints and crashes
            self._process = subprocess.Popen(
                [python, "-m", "worker.handler_host", "--package-dir", str(package_dir),
                 "--entrypoint", entrypoint],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                cwd=package_dir, close_fds=True, env=_host_environment(),
            )
        self.setup_s = 0.0
        self.device = "cpu"
        self.setup_calls = 0
        self._lock = threading.Lock()

    def wait_ready(self, on_log: Callable[[str, str], None]) -> None:
        """Wait for setup() to finish; SetupFailed when it raised or the handler cannot be imported."""
        while True:
            event = self._next_event()
            if event is None:
                raise SetupFailed(f"setup failed: the handler process exited (code {self._process.wait()}) "
                                  "before setup() finished; see job.log")
            kind = event.get("event")
            if kind == "log":
                on_log(str(event.get("level")), str(event.get("message")))
            elif kind == "ready":
                self.setup_s = float(event.get("setup_s") or 0.0)
                self.device = str(event.get("device") or "cpu")
                self.setup_calls += 1
                return
            elif kind == "setup_failed":
                self._process.wait()
                raise SetupFailed(
                    f"setup failed: {event.get('type')}: {event.get('message')}; fix the handler's setup() "
                    f"(or its imports) and deploy again. Traceback tail:\n{str(event.get('traceback'))[-1200:]}"
                )

    def run_job(self, job: dict[str, Any], on_log: Callable[[str, str], None],
                on_progress: Callable[[int, int], None],
                on_started: Callable[[float], None] = lambda at: None) -> JobResult:
        with self._lock:
            assert self._process.stdin is not None
            try:
                self._process.stdin.write((json.dumps({"job": job}) + "\n").encode())
                self._process.stdin.flush()
            except OSError as exc:
                raise HostDied(f"the handler process is gone ({exc}); the job can be resubmitted") from exc
            while True:
                event = self._next_event()
                if event is None:
                    code = self._process.wait()
                    raise HostDied(
                        f"the handler process exited in the middle of the job (exit code {code}; negative: "
                        "killed by that signal, e.g. -9 when out of memory); see job.log and run.log"
                    )
                kind = event.get("event")
                if kind == "log":
                    on_log(str(event.get("level")), str(event.get("message")))
                elif kind == "process_started":
                    on_started(float(event.get("at") or 0.0))
                elif kind == "progress":
                    on_progress(int(event.get("done") or 0), int(event.get("total") or 0))
                elif kind == "done":
                    return JobResult(event["counts"], event.get("process_error"), event.get("first_error"),
                                     float(event.get("process_s") or 0.0), float(event.get("results_s") or 0.0))

    @property
    def pid(self) -> int:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._process.poll() is None

    def close(self) -> None:
        if self._process.stdin is not None:
            try:
                self._process.stdin.close()  # EOF: the host returns
            except OSError:
                pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()

    def _next_event(self) -> dict[str, Any] | None:
        assert self._process.stdout is not None
        line = self._process.stdout.readline(MAX_EVENT_BYTES)
        if not line:
            return None
        try:
            event = json.loads(line)
        except ValueError:
            return {"event": "log", "level": "WARNING", "message": "unreadable handler event"}
        return event if isinstance(event, dict) else {}


class HostPool:
    """The warm handler processes of one `run` process, by (package version, environment)."""

    def __init__(self) -> None:
        self._hosts: dict[HostKey, HandlerHost] = {}
        self._expected: set[str] = set()  # versions of batches this process runs or has taken
        self._lock = threading.Lock()

    def expect(self, versions) -> None:
        """This process will run jobs of these package versions (their process may not be up yet)."""
        with self._lock:
            self._expected.update(versions)

    def get(self, key: HostKey) -> HandlerHost | None:
        with self._lock:
            host = self._hosts.get(key)
        if host is not None and not host.is_alive():
            self.discard(key)
            return None
        return host

    def add(self, key: HostKey, host: HandlerHost) -> None:
        with self._lock:
            self._hosts[key] = host

    def discard(self, key: HostKey) -> None:
        with self._lock:
            host = self._hosts.pop(key, None)
        if host is not None:
            host.kill() if host.is_alive() else host.close()

    def items(self) -> list[tuple[HostKey, HandlerHost]]:
        with self._lock:
            return list(self._hosts.items())

    def has_package(self, version: str) -> bool:
        """Whether this process serves that package version, or will (the warm server's admission asks)."""
        with self._lock:
            return version in self._expected or any(key.package_version == version for key in self._hosts)

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()


def _host_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
