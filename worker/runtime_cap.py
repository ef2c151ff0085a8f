"""The job's runtime cap, enforced on the instance: past it, the job's failed manifest goes out, then the process dies.

The same path stops a job that can no longer renew its lease (worker/lease.py): it must not run unobserved.

The control plane's reaper also fails a job past its cap, but it cannot stop the process: without this, a
runaway job on an instance that other jobs keep up runs on, and later reports a result nobody may record.
A job's code cannot be interrupted from another thread (it may sit in torch), so the cap kills the whole
`run` process (SIGKILL). Jobs that were waiting their turn in it lose their heartbeat; the reaper dispatches
them again when their leases lapse.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("worker.runtime_cap")

EXPIRY_WRITE_SECONDS = 60.0  # the longest the failed manifest may take before the process is killed anyway


def kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def over_cap_error(seconds: float) -> str:
    return (
        f"the job ran past its {seconds:.0f}s maximum runtime and was stopped on the instance; split the input "
        "or raise max_job_runtime_seconds"
    )


class RuntimeCap:
    """One job's cap: arm() when the job starts; settle() before it writes its own manifest.

    At the cap (or at stop_now), `on_expiry(error)` (write the failed manifest) runs on a watchdog thread,
    bounded by EXPIRY_WRITE_SECONDS, then `kill` ends the process. settle() returns False once it has fired:
    the job must not write a manifest of its own then (the process is about to die). `seconds` None: no cap,
    only stop_now.
    """

    def __init__(
        self, seconds: float | None, on_expiry: Callable[[str], None], kill: Callable[[], None] = kill_this_process
    ):
        self.seconds = seconds
        self._on_expiry = on_expiry
        self._kill = kill
        self._lock = threading.Lock()
        self._settled = False
        self._fired = False
        self._timer = threading.Timer(seconds, self._expire) if seconds is not None else None
        if self._timer is not None:
            self._timer.daemon = True

    def arm(self) -> None:
        if self._timer is not None:
            self._timer.start()

    def settle(self) -> bool:
        """The job is done: disarm. False when the cap fired first (the job's result must not be written)."""
        with self._lock:
            self._settled = True
            if self._timer is not None:
                self._timer.cancel()
            return not self._fired

    def _expire(self) -> None:
        self.stop_now(over_cap_error(self.seconds or 0))

    def stop_now(self, error: str) -> bool:
        """End the job now with `error` in its failed manifest, then the process. False if it was done already."""
        with self._lock:
            if self._settled or self._fired:
                return False
            self._fired = True
        logger.error("stopping the job: writing its failed manifest and killing the process", extra={"error": error})
        writer = threading.Thread(target=self._write, args=(error,), name="job-stop-manifest", daemon=True)
        writer.start()
        writer.join(EXPIRY_WRITE_SECONDS)
        self._kill()
        return True

    def _write(self, error: str) -> None:
        try:
            self._on_expiry(error)
        except Exception:  # the kill must happen whatever the manifest's fate
            logger.exception("failed manifest for the job past its cap not written")


def wait_to_be_killed() -> None:
    """The job's thread after its cap fired: the watchdog kills the process; never return to write results."""
    while True:
        time.sleep(3600)
