"""The warm server: a `run` process that finished its batch waits for the next one, torch and models loaded.

After its batch, a `run` process whose specs allow it (server_linger_seconds > 0) takes the server role
(an flock on <job_root>/.server.lock; one server per job root) and listens on <job_root>/.server.sock
(mode 0600, in the 0700 job root). `launch` offers a batch to it (hand_over) before it starts a new
process:

1. launch writes the batch file <job_root>/.batches/<first job_id>.json and an empty offer token next to
   it (<batch file>.offer), connects (0.5 s), learns the server's pid from the socket (SO_PEERCRED),
   records it in each job's run.pid, and sends the batch file's path as one line, with the jobs' run.lock
   descriptors attached (SCM_RIGHTS), so the jobs stay locked against a second launch.
2. the server accepts only an existing regular file directly in <job_root>/.batches/ named
   j-<16 hex>.json; it takes the batch by removing the offer token, answers
   {"accepted": true, "pid": <its pid>} and runs the batch like any other (same slot rules, same code).
   Anything else is refused ({"accepted": false, "error": ...}); nothing in the message is executed.
3. whatever the answer (or none), whoever removes the offer token runs the batch: launch removes it to
   start a new `run` itself, and finds it gone when the server took the batch but its answer was lost.

While it runs a batch the server does not listen (connections are refused at once, so launch starts
another process); it exits after linger seconds without a batch, or on SIGTERM.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Callable

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

# run_batch(batch file, lock fds) -> the linger after it (None: keep the current one); it owns the fds
RunBatch = Callable[[Path, list[int]], "float | None"]


def offer_path(batch_path: Path) -> Path:
    return batch_path.with_name(batch_path.name + OFFER_SUFFIX)


# --- launch's side ----------------------------------------------------------------------------------


def hand_over(
    job_root: Path, batch_path: Path, lock_fds: list[int], record_pid: Callable[[int], None]
) -> int | None:
    """Offer the batch to a warm server; its pid when it took the batch, None when launch must start one.

    record_pid(pid) runs before the offer is sent (launch writes the jobs' run.pid with it).
    """
    offer = offer_path(batch_path)
    os.close(os.open(offer, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    pid: int | None = None
    accepted = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT_SECONDS)
            sock.connect(str(job_root / SERVER_SOCKET_NAME))
            peer_pid, peer_uid, _ = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            if peer_uid != os.getuid() or peer_pid <= 0:
                raise OSError("the warm server is not ours")
            pid = peer_pid
            record_pid(pid)
            socket.send_fds(sock, [str(batch_path.absolute()).encode() + b"\n"], lock_fds)
            sock.settimeout(ANSWER_TIMEOUT_SECONDS)
            answer = json.loads(_read_line(sock))
            accepted = isinstance(answer, dict) and answer.get("accepted") is True
    except (OSError, ValueError):  # no server, a refusal, or no answer: the offer token decides
        pass
    if accepted:
        return pid
    try:
        os.unlink(offer)
    except FileNotFoundError:
        return pid  # the server took the batch, its answer got lost
    return None


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) <= MAX_LINE_BYTES:
        chunk = sock.recv(MAX_LINE_BYTES)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


# --- the server's side --------------------------------------------------------------------------------


def serve(job_root: Path, linger: float, run_batch: RunBatch, terminating: Callable[[], bool]) -> None:
    """Be the warm server until idle for `linger` seconds or terminating(); return at once when another
    process is the server already (or the socket cannot be made)."""
    lock_fd = os.open(job_root / SERVER_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return
    path = job_root / SERVER_SOCKET_NAME
    listener: socket.socket | None = None
    try:
        deadline = time.monotonic() + linger
        while not terminating():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if listener is None:
                listener = _listen(path)
            listener.settimeout(min(remaining, POLL_SECONDS))
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                offered = _take_offer(conn, job_root, terminating)
                if offered is None:
                    continue
                listener.close()  # busy: launch gets "connection refused" and starts its own run
                listener = None
                path.unlink(missing_ok=True)
                try:
                    conn.sendall(json.dumps({"accepted": True, "pid": os.getpid()}).encode() + b"\n")
                except OSError:
                    pass  # launch finds the offer token gone and counts on this process
            batch_path, fds = offered
            _log("warm server runs a batch", batch=batch_path.name)
            next_linger = run_batch(batch_path, fds)
            if next_linger is not None:
                linger = next_linger
            deadline = time.monotonic() + linger
    except OSError as exc:
        _log("warm server stopped", error=str(exc))
    finally:
        if listener is not None:
            listener.close()
            path.unlink(missing_ok=True)
        os.close(lock_fd)


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


def _take_offer(
    conn: socket.socket, job_root: Path, terminating: Callable[[], bool]
) -> tuple[Path, list[int]] | None:
    """The offered batch, taken (its offer token removed), with the lock fds; None after a refusal."""
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
        batch_path = _checked_batch_path(data, job_root)
        if terminating():
            raise ValueError("the warm server is shutting down")
        os.unlink(offer_path(batch_path))  # taken: from here on this process runs the batch
        return batch_path, fds
    except (OSError, ValueError) as exc:
        reason = "no such offer" if isinstance(exc, FileNotFoundError) else str(exc)
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(json.dumps({"accepted": False, "error": reason[:200]}).encode() + b"\n")
        except OSError:
            pass
        return None


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
