"""Build the job package (the `worker/` package, console script `batchworker-job`) as a reproducible wheel.

The GPU instances install it at boot (terraform/templates/user_data.sh.tftpl) from the artifacts bucket.
Output: <out>/batchworker_job-<version>-py3-none-any.whl and <out>/job-package.json ({wheel, sha256,
version}), which Terraform reads. Same sources, same bytes: sorted entries, fixed timestamps and modes.
torch is not a dependency: it comes from the Deep Learning AMI's PyTorch environment.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "batchworker-job"
PACKAGE = "worker"
ENTRY_POINTS = {"batchworker-job": "worker.cli:main"}
# The part of the shared core the instance runs: job.toml parsing and safe unpacking of job packages.
# Standard library only (a unit test of batchworker/jobpkg pins that import closure).
SHARED_MODULES = (
    "batchworker/__init__.py",
    "batchworker/errors.py",
    "batchworker/jobpkg/__init__.py",
    "batchworker/jobpkg/archive.py",
    "batchworker/jobpkg/config.py",
    "batchworker/jobpkg/errors.py",
)
# What `worker/` imports besides torch and the standard library. Lower bounds only, and loose ones, so
# that the AMI's own numpy and Pillow (built with its torch) satisfy them and pip leaves them alone.
REQUIRES_DIST = ("boto3>=1.26", "numpy>=1.21", "pillow>=9.1")
SUMMARY = "batchworker job: runs on the GPU instance (batchworker-job launch | run)."

FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644


def project_metadata(repo_root: Path) -> dict:
    with (repo_root / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]


def wheel_name(version: str) -> str:
    return f"{DIST_NAME.replace('-', '_')}-{version}-py3-none-any.whl"


def collect_package_files(repo_root: Path) -> dict[str, bytes]:
    package_dir = repo_root / PACKAGE
    if not package_dir.is_dir():
        raise FileNotFoundError(f"package directory not found: {package_dir}")
    files = {
        (Path(PACKAGE) / path.relative_to(package_dir)).as_posix(): path.read_bytes()
        for path in package_dir.rglob("*.py")
        if "__pycache__" not in path.relative_to(package_dir).parts
    }
    files.update({name: (repo_root / name).read_bytes() for name in SHARED_MODULES})
    return files


def dist_info_files(version: str, requires_python: str | None) -> dict[str, bytes]:
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {DIST_NAME}",
        f"Version: {version}",
        f"Summary: {SUMMARY}",
    ]
    if requires_python:
        metadata.append(f"Requires-Python: {requires_python}")
    metadata += [f"Requires-Dist: {requirement}" for requirement in REQUIRES_DIST]
    wheel = ["Wheel-Version: 1.0", "Generator: batchworker scripts/build_job_package.py", "Root-Is-Purelib: true",
             "Tag: py3-none-any"]  # fmt: skip
    entry_points = [
        "[console_scripts]",
        *(f"{name} = {target}" for name, target in sorted(ENTRY_POINTS.items())),
    ]
    return {
        "METADATA": ("\n".join(metadata) + "\n").encode(),
        "WHEEL": ("\n".join(wheel) + "\n").encode(),
        "entry_points.txt": ("\n".join(entry_points) + "\n").encode(),
        "top_level.txt": f"batchworker\n{PACKAGE}\n".encode(),
    }


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so external_attr holds the mode on every build host
    info.external_attr = (0o100000 | FILE_MODE) << 16
    return info


def build(repo_root: Path, out_dir: Path) -> Path:
    """Write the wheel and job-package.json into out_dir; returns the wheel's path."""
    project = project_metadata(repo_root)
    version = project["version"]
    dist_info = f"{DIST_NAME.replace('-', '_')}-{version}.dist-info"
    entries = dict(sorted(collect_package_files(repo_root).items()))
    entries.update(
        {
            f"{dist_info}/{name}": data
            for name, data in sorted(dist_info_files(version, project.get("requires-python")).items())
        }
    )
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries.items())
    entries[record_name] = (record + f"{record_name},,\n").encode()

    out_dir.mkdir(parents=True, exist_ok=True)
    wheel_path = out_dir / wheel_name(version)
    tmp_path = wheel_path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():  # package files sorted, then dist-info, RECORD last
            archive.writestr(_zip_info(name), data)
    tmp_path.replace(wheel_path)

    descriptor = {
        "name": DIST_NAME,
        "version": version,
        "wheel": wheel_path.name,
        "sha256": hashlib.sha256(wheel_path.read_bytes()).hexdigest(),
    }
    (out_dir / "job-package.json").write_text(json.dumps(descriptor, indent=2, sort_keys=True) + "\n")
    return wheel_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "build" / "job", help="output directory (build/job)"
    )
    parser.add_argument(
        "--repo-root", type=Path, default=REPO_ROOT, help="repository to package (default: this one)"
    )
    args = parser.parse_args(argv)
    try:
        path = build(args.repo_root, args.out)
    except (FileNotFoundError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"build_job_package: {exc}", file=sys.stderr)
        return 1
    print(f"{path}  sha256={hashlib.sha256(path.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
