"""Prune the job root: the directories and batch files of jobs idle for longer than the retention.

A job directory keeps spec.json, run.log, job.log and manifest.json on the instance for debugging (the
manifest and job.log are in S3 as well); nothing else removes them, so without pruning they pile up for
the instance's whole life. `launch` calls prune_job_root() after it answered, and it does the work at most
once per PRUNE_INTERVAL_SECONDS (the mtime of <job_root>/.pruned). Kept light, like `launch`.

A directory goes only when nothing in it changed for RETENTION_SECONDS and its run.lock is free (no
process runs the job). It is renamed aside under the lock, then removed: a launch of the same job at that
moment finds no directory and fails with a retryable error instead of writing into one being removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from worker.paths import RUN_LOCK_NAME
from worker.server import BATCH_FILE_PATTERN, BATCHES_DIR
from worker.spec import is_valid_job_id

RETENTION_SECONDS = 7 * 24 * 3600
PRUNE_INTERVAL_SECONDS = 3600
PRUNED_MARKER_NAME = ".pruned"
TRASH_PREFIX = ".trash-"


def prune_job_root(job_root: Path, now: float | None = None, retention_seconds: float = RETENTION_SECONDS) -> int:
    """Remove what is older than the retention, unless pruned within the last interval; how many entries."""
    now = time.time() if now is None else now
    marker = job_root / PRUNED_MARKER_NAME
    try:
        if now - marker.stat().st_mtime < PRUNE_INTERVAL_SECONDS:
            return 0
    except FileNotFoundError:
        pass
    marker.touch(mode=0o600)
    os.utime(marker, (now, now))
    cutoff = now - retention_seconds
    removed = 0
    with os.scandir(job_root) as entries:
        for entry in entries:
            if entry.name.startswith(TRASH_PREFIX):  # left by a prune that was cut off
                shutil.rmtree(entry.path, ignore_errors=True)
            elif is_valid_job_id(entry.name) and entry.is_dir(follow_symlinks=False):
                removed += _prune_job_dir(Path(entry.path), cutoff)
    batches = job_root / BATCHES_DIR
    if batches.is_dir():
        with os.scandir(batches) as entries:
            for entry in entries:
                if BATCH_FILE_PATTERN.fullmatch(entry.name.removesuffix(".offer")) and _older(entry, cutoff):
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
    return removed


def _prune_job_dir(job_dir: Path, cutoff: float) -> int:
    if not _untouched_since(job_dir, cutoff):
        return 0
    try:
        lock_fd = os.open(job_dir / RUN_LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        lock_fd = None  # never claimed: nothing can be running it
    try:
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        trash = job_dir.with_name(TRASH_PREFIX + job_dir.name)
        os.rename(job_dir, trash)
    except OSError:  # BlockingIOError: a process holds the job, so it is not idle whatever the mtimes say
        return 0
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    shutil.rmtree(trash, ignore_errors=True)
    return 1


def _untouched_since(job_dir: Path, cutoff: float) -> bool:
    """True when the directory and every file directly in it were last modified before the cutoff."""
    if os.lstat(job_dir).st_mtime >= cutoff:
        return False
    with os.scandir(job_dir) as entries:
        return all(_older(entry, cutoff) for entry in entries)


def _older(entry: os.DirEntry, cutoff: float) -> bool:
    return entry.stat(follow_symlinks=False).st_mtime < cutoff
