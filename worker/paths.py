"""Where jobs live on the instance. Kept light: `batchworker-job launch` imports it and must answer fast."""

from __future__ import annotations

import os
from pathlib import Path

JOB_ROOT_ENV = "BATCHWORKER_JOB_ROOT"
DEFAULT_JOB_ROOT = "~/batchworker-jobs"
SPEC_NAME = "spec.json"  # in the job directory, written by `launch`
RUN_LOCK_NAME = "run.lock"  # held (flock) by the `run` process (or warm server) running the job's batch


def job_root_from_env() -> Path:
    return Path(os.environ.get(JOB_ROOT_ENV) or DEFAULT_JOB_ROOT).expanduser()


def job_dir_for(job_root: Path, job_id: str) -> Path:
    """<job_root>/<job_id>; job_id is validated (^j-[0-9a-f]{16}$) before it gets here."""
    return job_root / job_id


def write_private(path: Path, text: str) -> None:
    """Replace the file atomically (readers never see half of it), mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
