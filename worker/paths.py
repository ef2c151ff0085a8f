"""Where jobs live on the instance. Kept light: `batchworker-job launch` imports it and must answer fast."""

from __future__ import annotations

import os
from pathlib import Path

JOB_ROOT_ENV = "BATCHWORKER_JOB_ROOT"
DEFAULT_JOB_ROOT = "~/batchworker-jobs"
RUN_LOCK_NAME = "run.lock"  # held (flock) by the `run` process (or warm server) running the job's batch


def job_root_from_env() -> Path:
    return Path(os.environ.get(JOB_ROOT_ENV) or DEFAULT_JOB_ROOT).expanduser()


def job_dir_for(job_root: Path, job_id: str) -> Path:
    """<job_root>/<job_id>; job_id is validated (^j-[0-9a-f]{16}$) before it gets here."""
    return job_root / job_id
