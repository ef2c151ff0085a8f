"""Pruning the instance's job root (worker/prune.py): old idle job directories go, nothing else does."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from worker.prune import PRUNE_INTERVAL_SECONDS, RETENTION_SECONDS, prune_job_root

DAY = 24 * 3600


def make_job_dir(job_root: Path, job_id: str, age_seconds: float, now: float) -> Path:
    """A finished job's directory whose files were all last written age_seconds ago."""
    job_dir = job_root / job_id
    job_dir.mkdir(parents=True)
    for name in ("spec.json", "run.log", "job.log", "manifest.json", "run.lock", "run.done"):
        (job_dir / name).write_text("x")
    for path in [*job_dir.iterdir(), job_dir]:
        os.utime(path, (now - age_seconds, now - age_seconds))
    return job_dir


def test_removes_old_idle_job_directories_and_batch_files_only(tmp_path):
    # GIVEN a job root with an old finished job, a recent one, an old one with one recent file, an old
    # batch file, a recent one, and entries that are not jobs
    now = time.time()
    old = make_job_dir(tmp_path, "j-" + "1" * 16, RETENTION_SECONDS + DAY, now)
    recent = make_job_dir(tmp_path, "j-" + "2" * 16, DAY, now)
    touched = make_job_dir(tmp_path, "j-" + "3" * 16, RETENTION_SECONDS + DAY, now)
    os.utime(touched / "job.log", (now - 60, now - 60))
    stranger = tmp_path / "not-a-job"
    stranger.mkdir()
    os.utime(stranger, (now - 10 * RETENTION_SECONDS,) * 2)
    batches = tmp_path / ".batches"
    batches.mkdir()
    old_batch, new_batch = batches / ("j-" + "1" * 16 + ".json"), batches / ("j-" + "2" * 16 + ".json")
    for path, age in ((old_batch, RETENTION_SECONDS + DAY), (new_batch, DAY)):
        path.write_text("{}")
        os.utime(path, (now - age, now - age))
    # WHEN the job root is pruned
    removed = prune_job_root(tmp_path, now=now)
    # THEN only the old idle job directory and the old batch file are gone
    assert removed == 2
    assert not old.exists() and not old_batch.exists()
    assert recent.is_dir() and touched.is_dir() and stranger.is_dir() and new_batch.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trash-")]


def test_keeps_an_old_job_whose_run_lock_is_held(tmp_path):
    # GIVEN an old job directory whose run.lock a process holds (a job that runs longer than the retention)
    now = time.time()
    job_dir = make_job_dir(tmp_path, "j-" + "4" * 16, RETENTION_SECONDS + DAY, now)
    lock_fd = os.open(job_dir / "run.lock", os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        # WHEN the job root is pruned THEN the directory stays
        assert prune_job_root(tmp_path, now=now) == 0
        assert (job_dir / "manifest.json").exists()
    finally:
        os.close(lock_fd)


def test_prunes_at_most_once_per_interval(tmp_path):
    # GIVEN a job root pruned a minute ago, and an old job directory that appeared since
    now = time.time()
    assert prune_job_root(tmp_path, now=now - 60) == 0
    job_dir = make_job_dir(tmp_path, "j-" + "5" * 16, RETENTION_SECONDS + DAY, now)
    # WHEN pruned again within the interval THEN nothing happens; after the interval it goes
    assert prune_job_root(tmp_path, now=now) == 0 and job_dir.exists()
    assert prune_job_root(tmp_path, now=now - 60 + PRUNE_INTERVAL_SECONDS + 1) == 1 and not job_dir.exists()


def test_does_not_follow_a_symlinked_job_directory(tmp_path):
    # GIVEN an old "job directory" that is a symlink to a directory outside the job root
    now = time.time()
    outside = make_job_dir(tmp_path / "outside", "j-" + "6" * 16, RETENTION_SECONDS + DAY, now)
    root = tmp_path / "root"
    root.mkdir()
    (root / outside.name).symlink_to(outside)
    # WHEN the job root is pruned THEN the target is untouched
    prune_job_root(root, now=now)
    assert (outside / "manifest.json").exists()
