"""The warm server: one `run` process per job root takes later batches, torch and models loaded.

A `run` process whose specs allow it (server_linger_seconds > 0) takes the server role when it starts
(an flock on <job_root>/.server.lock; one server per job root) and listens on <job_root>/.server.sock
(mode 0600, in the 0700 job root) from a thread. `launch` offers a batch to it (hand_over) before it
starts a new process:

1. launch writes the batch file <job_root>/.batches/<first job_id>.json and an empty offer token next to
   it (<batch file>.offer), connects (0.5 s), checks the listener's uid (SO_PEERCRED), and sends the
   batch file's path as one line, with the jobs' run.lock descriptors attached (SCM_RIGHTS), so the
   jobs stay locked against a second launch.
2. the server accepts only an existing regular file directly in <job_root>/.batches/ named
   j-<16 hex>.json; it takes the batch by removing the offer token, writes its pid to the jobs' run.pid,
   answers {"accepted": true, "pid": <its pid>} and runs the batch like any other (same slot rules,
   same code).
   Anything else is refused ({"accepted": false, "error": ...}); nothing in the message is executed.
3. whatever the answer (or none), whoever removes the offer token runs the batch: launch removes it to
   start a new `run` itself, and finds it gone when the server took the batch but its answer was lost.

Idle, the server takes any batch. Busy, it takes a batch only if the batch would wait for the instance's
only slot anyway (max_concurrent_jobs 1), or if every job of it runs a package whose handler this process
has warm: it queues behind the running one, its leases renewed, instead of a new process starting the
package's handler and its setup() again; otherwise it refuses ("busy") and launch starts a process that can
use a free slot. The server exits after linger seconds without a
batch, or on SIGTERM (batches it took still run, failing at once as interrupted).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SERVER_SOCKET_NAME = ".server.sock"
SERVER_LOCK_NAME = ".server.lock"
BATCHES_DIR = ".batches"  # <job_root>/.batches/<first job_id>.json = {"jobs": [job_id, ...]}
OFFER_SUFFIX = ".offer"
BATCH_FILE_PATTERN = re.compile(r"^j-[0-9a-f]{16}\.json$")
CONNECT_TIMEOUT_SECONDS = 0.5
ANSWER_TIMEOUT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 1.0
POLL_SECONDS = 0.25  # how soon an idle server notices SIGTERM
MAX_LINE_BYTES = 4096
MAX_FDS = 256  # spec.MAX_BATCH_JOBS
_UCRED = struct.Struct("3i")  # pid, uid, gid


def offer_path(batch_path: Path) -> Path:
    return batch_path.with_name(batch_path.name + OFFER_SUFFIX)


# --- launch's side ----------------------------------------------------------------------------------


def hand_over(
    job_root: Path, batch_path: Path, lock_fds: list[int], recorded_pid: Callable[[], int | None]
) -> int | None:
    """Offer the batch to a warm server; its pid when it took the batch, None when launch must start one.

    The server writes the jobs' run.pid before it answers; recorded_pid() reads it back when the answer
    got lost (-1 when even that fails).
    """
    offer = offer_path(batch_path)
    os.close(os.open(offer, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    answer: object = None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT_SECONDS)
            sock.connect(str(job_root / SERVER_SOCKET_NAME))
            # The uid of whoever listens (the server, or the launch that claimed the role for it).
            _, peer_uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if peer_uid != os.getuid():
                raise OSError("the warm server is not ours")
            socket.send_fds(sock, [str(batch_path.absolute()).encode() + b"\n"], lock_fds)
            sock.settimeout(ANSWER_TIMEOUT_SECONDS)
            answer = json.loads(_read_line(sock))
    except (OSError, ValueError):  # no server, or no answer: the offer token decides
        pass
    if isinstance(answer, dict) and answer.get("accepted") is True:
        pid = answer.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            return pid
    else:
        try:
            os.unlink(offer)
            return None  # refused, or nobody there: launch runs the batch
        except FileNotFoundError:
            pass  # the server took the batch; its answer got lost
    recorded = recorded_pid()
    return recorded if recorded is not None else -1


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) <= MAX_LINE_BYTES:
        chunk = sock.recv(MAX_LINE_BYTES)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


# --- the server's side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerRole:
    """The server lock, held, and the listening socket: claimed by launch for the `run` it starts, so a
    launch right after it already finds the socket (the connection waits in the backlog)."""

    lock_fd: int
    listener_fd: int

    def close(self) -> None:
        os.close(self.listener_fd)
        os.close(self.lock_fd)


def claim_role(job_root: Path) -> ServerRole | None:
    """Take the server role; None when another process has it (or the socket cannot be made)."""
    lock_fd = os.open(job_root / SERVER_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        listener = _listen(job_root / SERVER_SOCKET_NAME)
    except OSError as exc:
        os.close(lock_fd)
        if not isinstance(exc, BlockingIOError):
            _log("warm server not started", error=str(exc))
        return None
    return ServerRole(lock_fd, listener.detach())


@dataclass
class Offered:
    """A batch this process took: it runs it, after whatever it runs now and whatever it took earlier."""

    batch_path: Path
    lock_fds: list[int]  # the jobs' run.lock, held until the batch ends
    taken_at: float = field(default_factory=time.monotonic)
    taken_at_utc: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    context: Any = None  # set by on_taken (the lease heartbeat of a batch that waits)


# admit(batch file, busy) -> take it? Called in the listener thread; busy: this process has work already.
Admit = Callable[[Path, bool], bool]


class Server:
    """The job root's warm server: listens on .server.sock from the start of its `run` process.

    Idle, it takes any offered batch. Busy, it takes one only when admit() says so (worker/cli.py: a batch
    that would wait for the instance's only slot anyway, or whose packages' handlers are warm here; otherwise
    launch starts a new process that can use a free slot). Batches run in the order they were taken.
    """

    def __init__(
        self, job_root: Path, lock_fd: int, listener: socket.socket, admit: Admit,
        on_taken: Callable[[Offered], None], terminating: Callable[[], bool],
    ) -> None:
        self.job_root = job_root
        self._lock_fd = lock_fd
        self._listener = listener
        self._admit = admit
        self._on_taken = on_taken
        self._terminating = terminating
        self._queue: deque[Offered] = deque()
        self._running = True  # the process's own batch comes first
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._accept_loop, name="warm-server", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls, job_root: Path, role: "ServerRole | None", admit: Admit, on_taken: Callable[[Offered], None],
        terminating: Callable[[], bool],
    ) -> "Server | None":
        """Serve with the role launch claimed for this process, or claim it now; None when another process
        has it (or the socket cannot be made)."""
        role = role or claim_role(job_root)
        if role is None:
            return None
        listener = socket.socket(fileno=role.listener_fd)
        listener.settimeout(POLL_SECONDS)
        return cls(job_root, role.lock_fd, listener, admit, on_taken, terminating)

    def next_batch(self, linger: float) -> Offered | None:
        """The next batch to run: one taken already, else the first offered within `linger` seconds.

        None when none came, or on terminating(); close() then returns any taken in the meantime.
        """
        deadline = time.monotonic() + linger
        with self._changed:
            self._running = False
            while not self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._terminating():
                    return None
                self._changed.wait(min(remaining, POLL_SECONDS))
            self._running = True
            return self._queue.popleft()

    def close(self) -> list[Offered]:
        """Stop listening and give up the role; the batches taken but not run yet (the caller runs them)."""
        with self._changed:
            self._closing = True
        self._thread.join(POLL_SECONDS + READ_TIMEOUT_SECONDS + ANSWER_TIMEOUT_SECONDS)
        self._listener.close()
        (self.job_root / SERVER_SOCKET_NAME).unlink(missing_ok=True)
        os.close(self._lock_fd)
        with self._changed:
            left, self._queue = list(self._queue), deque()
        return left

    def _accept_loop(self) -> None:
        while True:
            with self._changed:
                if self._closing:
                    return
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                _log("warm server stopped listening", error=str(exc))
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            batch_path, fds = _receive_offer(conn, self.job_root)
            with self._changed:
                if self._closing or self._terminating():
                    raise ValueError("the warm server is shutting down")
                if not self._admit(batch_path, self._running or bool(self._queue)):
                    raise ValueError("busy")
                os.unlink(offer_path(batch_path))  # taken: from here on this process runs the batch
                offered = Offered(batch_path, fds)
                try:
                    self._on_taken(offered)
                except Exception as exc:  # the batch is ours now: it must still run
                    _log("preparing a taken batch failed", batch=batch_path.name, error=repr(exc))
                self._queue.append(offered)
                self._changed.notify()
        except (OSError, ValueError) as exc:
            reason = "no such offer" if isinstance(exc, FileNotFoundError) else str(exc)
            for fd in fds:
                os.close(fd)
            _send_answer(conn, {"accepted": False, "error": reason[:200]})
            return
        _send_answer(conn, {"accepted": True, "pid": os.getpid()})  # lost: launch finds the offer token gone
        _log("warm server took a batch", batch=batch_path.name, queued=len(self._queue))


def _listen(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)  # left by a killed server; we hold the server lock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen(): nobody connects in between
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def _receive_offer(conn: socket.socket, job_root: Path) -> tuple[Path, list[int]]:
    """The offered batch file and the lock fds sent with it; on an error the fds received are closed."""
    fds: list[int] = []
    try:
        conn.settimeout(READ_TIMEOUT_SECONDS)
        _, peer_uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if peer_uid != os.getuid():
            raise ValueError("only the job root's owner may offer batches")
        data = b""
        while b"\n" not in data and len(data) <= MAX_LINE_BYTES:
            chunk, got, _flags, _addr = socket.recv_fds(conn, MAX_LINE_BYTES + 1, MAX_FDS)
            fds.extend(got)
            if not chunk:
                break
            data += chunk
        return _checked_batch_path(data, job_root), fds
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        raise


def _send_answer(conn: socket.socket, answer: dict) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass


def _checked_batch_path(data: bytes, job_root: Path) -> Path:
    """The batch file a message names: an existing regular file directly in <job_root>/.batches/."""
    line, newline, rest = data.partition(b"\n")
    if not newline or rest or len(line) > MAX_LINE_BYTES:
        raise ValueError("expected one line: the path of a batch file")
    text = line.decode("utf-8")  # UnicodeDecodeError is a ValueError
    named = Path(text)
    batches = job_root / BATCHES_DIR
    if (
        "\0" in text
        or not named.is_absolute()
        or not BATCH_FILE_PATTERN.fullmatch(named.name)
        or os.path.realpath(named.parent) != os.path.realpath(batches)
    ):
        raise ValueError("not a batch file of this job root")
    batch_path = batches / named.name
    try:
        is_file = stat.S_ISREG(os.lstat(batch_path).st_mode)
    except OSError:
        is_file = False
    if not is_file:
        raise ValueError("not a batch file of this job root")
    return batch_path


def _log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), file=sys.stderr, flush=True)
