"""Per-instance concurrency slots: at most N jobs (or batches) use the device at once.

Slot i is an flock on <job_root>/.slots/slot-<i>.lock; the kernel releases it when the process dies, so a
killed job never leaks its slot.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

SLOTS_DIR = ".slots"
POLL_SECONDS = 0.2


class Slot:
    """One held slot; release() (or the process exiting) frees it."""

    def __init__(self, index: int, fd: int, waited_seconds: float) -> None:
        self.index = index
        self.waited_seconds = waited_seconds
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def acquire_slot(job_root: Path, count: int, poll_seconds: float = POLL_SECONDS) -> Slot:
    """Block until one of `count` slots is free and take it; the first free slot wins."""
    directory = job_root / SLOTS_DIR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    started = time.monotonic()
    while True:
        for index in range(count):
            fd = os.open(directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except OSError:
                os.close(fd)
                raise
            return Slot(index, fd, time.monotonic() - started)
        time.sleep(poll_seconds)
