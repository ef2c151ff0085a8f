"""`batchworker job run` and the runtime half of `job validate`: the instance's runner, in a local process.

The same run_jobs() as on the instance (package cache, environment, warm handler process, results,
manifest), with files instead of S3: each input file is one job; what the instance uploads to
s3://<output>/jobs/<job_id>/... lands in <out>/jobs/<job_id>/...
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from worker.errors import InputError, StorageError
from worker.packages import PACKAGES_DIR
from worker.spec import JobSpec, PackageRef
from worker.storage import AlreadyWritten, ObjectInfo

INPUT_BUCKET = "local-input"
OUTPUT_BUCKET = "local-output"
DEFAULT_JOB_ROOT = Path("~/.cache/batchworker/job-run")
SAMPLE_DIR = "sample"


class LocalStorage:
    """Storage (worker/storage.py) over local files: inputs by key, outputs under out_dir/<key>."""

    def __init__(self, inputs: dict[str, Path], out_dir: Path) -> None:
        self._inputs = inputs
        self._out = out_dir

    def download(self, bucket: str, key: str, dest: Path, *, version_id: str | None = None,
                 max_bytes: int | None = None) -> ObjectInfo:
        source = self._inputs.get(key) if bucket == INPUT_BUCKET else None
        if source is None:
            raise StorageError(f"{bucket}/{key} is not a local input", transient=False)
        size = source.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"{source.name} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
        shutil.copyfile(source, dest)
        return ObjectInfo(size, "", None)

    def upload_file(self, path: Path, bucket: str, key: str, content_type: str) -> None:
        target = self._target(key)
        shutil.copyfile(path, target)

    def put_json(self, bucket: str, key: str, document: dict[str, Any], only_if_absent: bool = False) -> None:
        target = self._target(key)
        if only_if_absent and target.exists():
            raise AlreadyWritten(f"{key} exists")
        target.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def _target(self, key: str) -> Path:
        target = self._out / key  # keys are jobs/<job_id>/..., made by the runner, never by an input
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


def package_version(package_dir: Path) -> str:
    """The version `job deploy` would give the folder: the sha256 of its deterministic archive."""
    from batchworker.jobpkg import build_archive

    with tempfile.TemporaryDirectory(prefix="batchworker-version-") as scratch:
        return build_archive(package_dir, Path(scratch)).sha256


def run_local(package_dir: Path, inputs: list[Path], out_dir: Path, params: dict[str, str] | None = None,
              job_root: Path | None = None) -> list[dict[str, Any]]:
    """Run each input as one job of the package, as the instance would; their manifests, in input order."""
    from worker.packages import load_config
    from worker.runner import run_jobs

    package_dir = Path(package_dir).resolve()
    config = load_config(package_dir)
    version = package_version(package_dir)
    job_root = (job_root or DEFAULT_JOB_ROOT).expanduser()
    job_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    _link_package(job_root, version, package_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keyed = {f"{index}/{path.name}": Path(path) for index, path in enumerate(inputs, start=1)}
    ref = PackageRef(config.name, version, f"s3://{OUTPUT_BUCKET}/local-packages/{version}.tar.gz")
    specs = [_spec(key, ref, params or {}) for key in keyed]
    run_jobs(specs, job_root, storage=LocalStorage(keyed, out_dir))  # type: ignore[arg-type]
    return [json.loads((out_dir / spec.output_key("manifest.json")).read_text(encoding="utf-8")) for spec in specs]


def validate_runtime(package_dir: Path, out_dir: Path | None = None, job_root: Path | None = None) -> list[str]:
    """Run the package on its sample/ files like the instance would; the problems found (empty: fine)."""
    samples = sorted(p for p in (Path(package_dir) / SAMPLE_DIR).glob("*") if p.is_file())
    if not samples:
        return []
    with tempfile.TemporaryDirectory(prefix="batchworker-validate-") as scratch:
        manifests = run_local(package_dir, samples, out_dir or Path(scratch), job_root=job_root)
    return [f"{SAMPLE_DIR}/{sample.name}: {manifest['error']}"
            for sample, manifest in zip(samples, manifests, strict=True) if manifest["status"] != "succeeded"]


def _link_package(job_root: Path, version: str, package_dir: Path) -> None:
    """<job_root>/.packages/<version> -> the folder: the runner finds it as an instance finds a cached one."""
    cache = job_root / PACKAGES_DIR
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    link = cache / version
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == package_dir:
            return
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    tmp = cache / f".{version}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(package_dir, target_is_directory=True)
    os.replace(tmp, link)


def _spec(key: str, ref: PackageRef, params: dict[str, str]) -> JobSpec:
    job_id = f"j-{secrets.token_hex(8)}"
    return JobSpec(
        job_id=job_id, input_bucket=INPUT_BUCKET, input_key=key, input_version_id=None,
        output_bucket=OUTPUT_BUCKET, output_prefix=f"jobs/{job_id}/", instance_id="local",
        max_concurrent_jobs=1, server_linger_seconds=0, package=ref, params=dict(params),
    )
