"""The job's manifest.json (docs/architecture.md, "Manifest") and the timings that go into it."""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.spec import JobSpec

MANIFEST_NAME = "manifest.json"
MAX_ERROR_CHARS = 2000
PHASES = ("slot_wait_s", "download_s", "model_load_s", "inference_s", "upload_s")  # always in timings


class JobStatus(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Timings:
    """Wall-clock start/finish and seconds spent per phase; phases may be measured more than once.

    Phases other than PHASES (a package's package_s, environment_s, results_s) appear once measured.
    """

    started_at: dt.datetime = field(default_factory=utc_now)
    finished_at: dt.datetime | None = None
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _started_monotonic: float = field(default_factory=time.monotonic)
    _total_s: float | None = None

    @classmethod
    def since(cls, started_at: dt.datetime, started_monotonic: float) -> "Timings":
        """Timings of a job that began earlier (taken into a warm server's queue then)."""
        return cls(started_at=started_at, _started_monotonic=started_monotonic)

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - started

    def finish(self) -> None:
        self.finished_at = utc_now()
        self._total_s = time.monotonic() - self._started_monotonic

    def to_json(self) -> dict[str, Any]:
        if self.finished_at is None:
            self.finish()
        return {
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            **{phase: round(value, 3) for phase, value in self.seconds.items()},
            "total_s": round(self._total_s or 0.0, 3),
        }


def build_manifest(
    spec: JobSpec,
    *,
    status: JobStatus,
    outputs: list[str],
    error: str | None,
    timings: Timings,
    items: int,
    device: str,
    input_version_id: str | None,
    instance_id: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest; `extra`: a job package's fields (package, environment, item counts)."""
    if error is not None and len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    return {
        "job_id": spec.job_id,
        "status": status.value,
        "input": {"bucket": spec.input_bucket, "key": spec.input_key, "version_id": input_version_id},
        "outputs": list(outputs),
        "error": error,
        "timings": timings.to_json(),
        "items": items,
        "device": device,
        "package": spec.package.to_json(),  # the package's report (extra) says the same and more
        "instance_id": instance_id,
        **(extra or {}),
    }


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None
