"""Warm handler subprocesses for the local Lambda runtime: one pool per function, bounded concurrency."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchworker.errors import BatchworkerError

logger = logging.getLogger(__name__)

BOOTSTRAP = Path(__file__).with_name("lambda_bootstrap.py")
MIN_INIT_TIMEOUT_SECONDS = 10.0


class PoolClosed(BatchworkerError):
    """The runtime is stopping: the function takes no more invocations."""


@dataclass(frozen=True)
class FunctionSpec:
    """What the runtime needs to know about one deployed function (read from moto)."""

    name: str
    arn: str
    handler: str
    code_dir: Path
    timeout_seconds: int
    memory_mb: int
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InvocationResult:
    """The outcome of one invocation: a JSON payload, or an error shaped like Lambda's."""

    request_id: str
    payload: str | None = None
    error_type: str | None = None
    error_message: str | None = None

    @property
    def is_error(self) -> bool:
        return self.error_type is not None

    def error_body(self) -> str:
        return json.dumps({"errorMessage": self.error_message, "errorType": self.error_type})

    def result(self) -> Any:
        return json.loads(self.payload) if self.payload is not None else None


class HandlerProcess:
    """One warm "container": a bootstrap subprocess that has imported the handler."""

    def __init__(self, spec: FunctionSpec, env: dict[str, str], log_path: Path) -> None:
        self.spec = spec
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", str(BOOTSTRAP), spec.handler],
                cwd=spec.code_dir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # one process group: a timeout kills whatever the handler started
            )
        self._buffer = b""
        self._init_timeout_seconds = max(MIN_INIT_TIMEOUT_SECONDS, spec.timeout_seconds)
        self.init_error: InvocationResult | None = None
        ready = self._read_message(time.monotonic() + self._init_timeout_seconds)
        if ready is None:
            self.init_error = self._died_or_timed_out("", "init")
        elif not ready.get("ready"):
            self.init_error = InvocationResult(
                "", error_type=ready["errorType"], error_message=ready["errorMessage"]
            )
            self.kill()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def invoke(self, payload: str, request_id: str) -> InvocationResult:
        started = time.monotonic()
        deadline_ms = int(time.time() * 1000) + self.spec.timeout_seconds * 1000
        request = {
            "request_id": request_id,
            "payload": payload,
            "deadline_ms": deadline_ms,
            "invoked_function_arn": self.spec.arn,
        }
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return self._died_or_timed_out(request_id, "invoke")
        response = self._read_message(started + self.spec.timeout_seconds)
        if response is None:
            return self._died_or_timed_out(request_id, "invoke")
        if response["ok"]:
            return InvocationResult(request_id, payload=response["payload"])
        error = response["error"]
        return InvocationResult(
            request_id, error_type=error["errorType"], error_message=error["errorMessage"]
        )

    def terminate(self) -> None:
        """SIGKILL the process group; safe from any thread (the owner then sees the pipe close)."""
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Terminate, reap and close the pipes; only the thread that owns the process calls this."""
        self.terminate()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()

    def _died_or_timed_out(self, request_id: str, phase: str) -> InvocationResult:
        if self._proc.poll() is None:
            self.kill()
            limit = self.spec.timeout_seconds if phase == "invoke" else self._init_timeout_seconds
            message = f"RequestId: {request_id} Error: Task timed out after {limit:.2f} seconds"
            return InvocationResult(request_id, error_type="Sandbox.Timedout", error_message=message)
        code = self._proc.returncode
        self.kill()
        message = f"RequestId: {request_id} Error: Runtime exited with error: exit status {code}"
        return InvocationResult(request_id, error_type="Runtime.ExitError", error_message=message)

    def _read_message(self, deadline: float) -> dict[str, Any] | None:
        """The next protocol line, or None when the deadline passes or the process exits."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


class FunctionPool:
    """Up to `max_concurrency` warm processes for one function; callers beyond that wait their turn."""

    def __init__(self, spec: FunctionSpec, env: dict[str, str], log_path: Path, max_concurrency: int) -> None:
        self.spec = spec
        self._env = env
        self._log_path = log_path
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._idle: list[HandlerProcess] = []
        self._busy: set[HandlerProcess] = set()
        self._closed = False

    def invoke(self, payload: str, request_id: str | None = None) -> InvocationResult:
        """Run the handler on `payload` (event JSON text) in a warm process; block while all are busy.

        Raises PoolClosed once the runtime is stopping."""
        request_id = request_id or str(uuid.uuid4())
        with self._slots:
            process = self._checkout()
            if process.init_error is not None:
                self._discard(process)
                return InvocationResult(
                    request_id,
                    error_type=process.init_error.error_type,
                    error_message=process.init_error.error_message,
                )
            result = process.invoke(payload, request_id)
            if process.is_alive():
                self._checkin(process)
            else:
                self._discard(process)
        if result.is_error:
            logger.info(
                "%s %s failed: %s %s", self.spec.name, request_id, result.error_type, result.error_message
            )
            if result.error_type in ("Sandbox.Timedout", "Runtime.ExitError"):
                self._append_log(f"{result.error_message}\n")
        return result

    def close(self) -> None:
        """Kill every process, idle or busy; later invocations raise PoolClosed."""
        with self._lock:
            self._closed = True
            idle, busy = list(self._idle), list(self._busy)
            self._idle.clear()
        for process in idle:
            process.kill()
        for process in busy:
            process.terminate()  # its invoking thread reaps it and reports Runtime.ExitError

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in (*self._idle, *self._busy)]

    def _checkout(self) -> HandlerProcess:
        with self._lock:
            while self._idle:
                process = self._idle.pop()
                if process.is_alive():
                    self._busy.add(process)
                    return process
                process.kill()
            if self._closed:
                raise PoolClosed(
                    f"the local Lambda runtime is stopping: {self.spec.name} takes no invocations"
                )
        process = HandlerProcess(self.spec, self._env, self._log_path)
        with self._lock:
            self._busy.add(process)
            if self._closed:
                self._busy.discard(process)
                process.kill()
                raise PoolClosed(
                    f"the local Lambda runtime is stopping: {self.spec.name} takes no invocations"
                )
        return process

    def _checkin(self, process: HandlerProcess) -> None:
        with self._lock:
            self._busy.discard(process)
            if self._closed:
                process.kill()
            else:
                self._idle.append(process)

    def _discard(self, process: HandlerProcess) -> None:
        with self._lock:
            self._busy.discard(process)
        process.kill()

    def _append_log(self, text: str) -> None:
        with open(self._log_path, "a", encoding="utf-8") as log:
            log.write(text)
