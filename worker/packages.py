"""Job packages on the instance: fetch the archive a job is pinned to, check it, unpack it once per version.

<job_root>/.packages/<version>/ is the unpacked package (version = the archive's sha256). It is unpacked
into a temporary directory under a lock and renamed into place, so a directory that exists is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import JobError
from worker.spec import PackageRef, parse_s3_uri
from worker.storage import Storage

PACKAGES_DIR = ".packages"
MAX_ARCHIVE_BYTES = 1024 * 1024 * 1024


class PackageError(JobError):
    """The job package cannot be used as deployed (bad archive, bad job.toml): redeploy it; not retried."""


@dataclass(frozen=True)
class Package:
    ref: PackageRef
    directory: Path
    config: Any  # batchworker.jobpkg.JobConfig
    cache_hit: bool


def load_config(directory: Path) -> Any:
    """The package's job.toml, checked (batchworker/jobpkg/config.py)."""
    from batchworker.jobpkg import JobPackageError, load_job_config

    try:
        return load_job_config(directory)
    except JobPackageError as exc:
        raise PackageError(f"the job package's job.toml is invalid: {exc}") from exc


def fetch_package(ref: PackageRef, job_root: Path, storage: Storage) -> Package:
    """The unpacked package, downloaded and unpacked now unless this instance has it already."""
    cache = job_root / PACKAGES_DIR
    final = cache / ref.version
    if final.is_dir():
        return Package(ref, final, load_config(final), True)
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(cache / f"{ref.version}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if final.is_dir():  # another job unpacked it while we waited
            return Package(ref, final, load_config(final), True)
        tmp = cache / f".{ref.version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            archive = tmp.with_name(tmp.name + ".archive")
            bucket, key = parse_s3_uri(ref.uri)
            storage.download(bucket, key, archive, max_bytes=MAX_ARCHIVE_BYTES)
            digest = _sha256(archive)
            if digest != ref.version:
                raise PackageError(
                    f"the archive of job package {ref.name!r} at {ref.uri} has sha256 {digest}, not the "
                    f"version {ref.version} the job was pinned to; deploy the package again"
                )
            unpack(archive, tmp / "package")
            os.replace(tmp / "package", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.with_name(tmp.name + ".archive").unlink(missing_ok=True)
        return Package(ref, final, load_config(final), False)
    finally:
        os.close(lock_fd)


def unpack(archive: Path, dest: Path) -> None:
    """Unpack with batchworker/jobpkg's safe extractor (no links, nothing outside dest, size bounds)."""
    from batchworker.jobpkg import JobPackageError, extract_archive

    try:
        extract_archive(archive, dest)
    except JobPackageError as exc:
        raise PackageError(f"the job package archive cannot be unpacked: {exc}; deploy it again") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()
