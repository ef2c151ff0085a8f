"""Build the Lambda zips (trigger, worker, stop) and the job package reproducibly: same inputs, same bytes.

Each zip holds lambdas/<name>/app.py as app.py, the batchworker/ package (without the local
cloud and the CLI) and, with --with-deps, the Lambda dependencies as Linux wheels for AWS, installed
from scripts/lambda-requirements.txt (pinned versions and hashes). The job package that the GPU
instances install (scripts/build_job_package.py) goes to build/job unless --no-job-package.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import build_job_package

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ("trigger", "worker", "stop", "reaper")
PACKAGE = "batchworker"
# Sub-packages the Lambdas never import.
EXCLUDED_SUBPACKAGES = ("local", "cli", "dashboard", "iamcheck")
LAMBDA_REQUIREMENTS = Path(__file__).resolve().parent / "lambda-requirements.txt"
PIP_PLATFORM_ARGS = (
    "--platform", "manylinux2014_x86_64",
    "--implementation", "cp",
    "--python-version", "3.11",
    "--only-binary=:all:",
)  # fmt: skip

FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644


def collect_package_files(repo_root: Path) -> dict[str, Path]:
    """Map archive name -> source file for every .py file of the batchworker package."""
    package_dir = repo_root / PACKAGE
    if not package_dir.is_dir():
        raise FileNotFoundError(f"package directory not found: {package_dir}")
    files: dict[str, Path] = {}
    for path in package_dir.rglob("*.py"):
        relative = path.relative_to(package_dir)
        if "__pycache__" in relative.parts:
            continue
        if len(relative.parts) > 1 and relative.parts[0] in EXCLUDED_SUBPACKAGES:
            continue
        files[(Path(PACKAGE) / relative).as_posix()] = path
    return files


def collect_dependency_files(deps_dir: Path) -> dict[str, Path]:
    """Map archive name -> source file for everything pip installed, minus what depends on the build host.

    Left out: bytecode caches; bin/ (console scripts whose shebang is the build machine's Python, never
    run in Lambda); dist-info RECORD files (they hash those scripts; imports and metadata need none).
    """
    files = {}
    for path in deps_dir.rglob("*"):
        relative = path.relative_to(deps_dir)
        if not path.is_file() or "__pycache__" in relative.parts or relative.parts[0] == "bin":
            continue
        if relative.parent.name.endswith(".dist-info") and relative.name == "RECORD":
            continue
        files[relative.as_posix()] = path
    return files


def install_dependencies(target: Path, requirements: Path = LAMBDA_REQUIREMENTS) -> None:
    """pip-install the pinned Lambda dependencies as Lambda (manylinux x86_64, CPython 3.11) wheels.

    --require-hashes and --no-deps: exactly the locked closure; --no-compile: no bytecode, whose
    names depend on the build machine's Python; --no-cache-dir: nothing from an earlier build.
    """
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
        *PIP_PLATFORM_ARGS, "--no-deps", "--require-hashes", "--no-compile",
        "--target", str(target), "-r", str(requirements),
    ]  # fmt: skip
    subprocess.run(command, check=True)


def write_zip(zip_path: Path, entries: dict[str, Path]) -> None:
    """Write entries sorted by name, with a fixed timestamp and permissions, deflated."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr holds the mode on every build host
            info.external_attr = (0o100000 | FILE_MODE) << 16
            archive.writestr(info, entries[name].read_bytes())
    tmp_path.replace(zip_path)


def build_function(name: str, repo_root: Path, out_dir: Path, dependencies: dict[str, Path]) -> Path:
    """Build out_dir/<name>.zip from lambdas/<name>/app.py, the package and the dependencies."""
    handler = repo_root / "lambdas" / name / "app.py"
    if not handler.is_file():
        raise FileNotFoundError(f"handler not found: {handler}")
    entries = {**dependencies, **collect_package_files(repo_root), "app.py": handler}
    zip_path = out_dir / f"{name}.zip"
    write_zip(zip_path, entries)
    return zip_path


def build_all(
    out_dir: Path, repo_root: Path = REPO_ROOT, with_deps: bool = False, functions: Iterable[str] = FUNCTIONS
) -> list[Path]:
    """Build every function's zip into out_dir; with_deps bundles the Lambda dependencies (for AWS)."""
    with tempfile.TemporaryDirectory(prefix="batchworker-deps-") as tmp:
        dependencies: dict[str, Path] = {}
        if with_deps:
            install_dependencies(Path(tmp))
            dependencies = collect_dependency_files(Path(tmp))
        return [build_function(name, repo_root, out_dir, dependencies) for name in functions]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "build" / "lambdas", help="output directory (build/lambdas)"
    )
    parser.add_argument(
        "--with-deps",
        action="store_true",
        help="bundle the locked dependencies (scripts/lambda-requirements.txt) as Lambda (manylinux2014_x86_64, "
        "cp311) wheels: what AWS needs; the local cloud runs without",
    )
    parser.add_argument(
        "--repo-root", type=Path, default=REPO_ROOT, help="repository to package (default: this one)"
    )
    parser.add_argument(
        "--job-package-out",
        type=Path,
        default=None,
        help="where the job package goes (default: <out>/../job)",
    )
    parser.add_argument(
        "--no-job-package",
        action="store_true",
        help="build the Lambda zips only, not the instance's job package",
    )
    args = parser.parse_args(argv)

    try:
        paths = build_all(args.out, repo_root=args.repo_root, with_deps=args.with_deps)
        if not args.no_job_package:
            paths.append(
                build_job_package.build(args.repo_root, args.job_package_out or args.out.parent / "job")
            )
    except (FileNotFoundError, KeyError, subprocess.CalledProcessError) as exc:
        print(f"build_lambdas: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path}  sha256={sha256_of(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
