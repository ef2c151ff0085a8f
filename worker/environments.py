"""Package environments on the instance: a venv per (requirements, Python version, platform), built once.

A package without requirements runs in the base environment (the job venv with the AMI's torch/CUDA).
One with requirements gets <envs>/<key>/: a venv without pip whose site-packages add the base
environment's behind its own (a .pth file), so torch, NumPy and our runtime come from the base and are
never installed again; a constraints file pins the base's torch family (and NumPy) so no requirement can
replace them. pip (run from the base, inside the venv) installs what is missing. `uv` would be faster but
checks only the venv's own site-packages, so it reinstalls what the base already has (pandas, even torch).

Builds happen in a temporary directory under an exclusive lock and are renamed into place when complete;
a failed build leaves a record (<key>.failed) that fails the package's next jobs at once for
FAILED_BUILD_REUSE_SECONDS instead of rebuilding for each. BATCHWORKER_PIP_ARGS (shell-like words, from the
operator, never from a job) adds installer options, e.g. `--no-index --find-links /opt/wheels` offline.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from worker.errors import JobError

BASE_KEY = "base"
PIP_ARGS_ENV = "BATCHWORKER_PIP_ARGS"
BUILD_TIMEOUT_SECONDS = 1800
FAILED_BUILD_REUSE_SECONDS = 300
# A job waiting for another job's build gives up after the longest a build can take (pip's timeout plus the
# venv steps) and a margin: a build that outlives that is stuck, and the waiting job is retried later.
BUILD_WAIT_SECONDS = BUILD_TIMEOUT_SECONDS + 300
LOCK_POLL_SECONDS = 0.5
OUTPUT_TAIL_CHARS = 3000
# Never installed into a package environment: the base's builds (CUDA-matched) are the ones to use.
PINNED_PATTERN = re.compile(r"^(torch|torchvision|torchaudio|triton|numpy|nvidia-.*)$")
BASE_PTH_NAME = "_batchworker_base.pth"


class EnvironmentBuildError(JobError):
    """The package's requirements cannot be installed: a package problem, not retried."""


class EnvironmentBusy(JobError):
    """Another job's build of the same environment did not finish in time: retried later."""

    transient = True


@dataclass(frozen=True)
class Environment:
    key: str  # BASE_KEY or the hash
    python: str  # the interpreter that runs the handler
    cache_hit: bool
    build_s: float

    def to_json(self) -> dict:
        return {"key": self.key, "cache_hit": self.cache_hit, "build_s": round(self.build_s, 3)}


def significant_requirements(text: str) -> str:
    """The requirements without comments and blank lines (what the key and the install see)."""
    lines = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            lines.append(line)
    return "\n".join(lines)


def environment_key(requirements: str) -> str:
    """sha256 of (requirements, Python version, platform), 16 hex characters."""
    material = "\n".join([
        significant_requirements(requirements),
        f"python {platform.python_version()} {sys.implementation.cache_tag}",
        f"platform {sysconfig.get_platform()} {platform.machine()}",
    ])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


def base_environment() -> Environment:
    return Environment(BASE_KEY, sys.executable, True, 0.0)


def ensure_environment(
    envs_dir: Path, requirements: str, log, wait_seconds: float = BUILD_WAIT_SECONDS
) -> Environment:
    """The environment for these requirements, built if needed (by this process or another, waiting for
    that build at most `wait_seconds`)."""
    if not significant_requirements(requirements):
        return base_environment()
    key = environment_key(requirements)
    envs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = envs_dir / key
    if (final / ".complete").exists():
        return Environment(key, str(_python(final)), True, 0.0)
    started = time.monotonic()
    lock_fd = os.open(envs_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(lock_fd, key, wait_seconds, log)  # another job may be building it: wait for its outcome
        if (final / ".complete").exists():
            return Environment(key, str(_python(final)), True, 0.0)
        _raise_recent_failure(envs_dir / f"{key}.failed")
        log.info("building the package environment", extra={"environment": key})
        _build(envs_dir, key, significant_requirements(requirements))
        build_s = time.monotonic() - started
        log.info("package environment built", extra={"environment": key, "build_s": round(build_s, 3)})
        return Environment(key, str(_python(final)), False, build_s)
    finally:
        os.close(lock_fd)


def _lock(lock_fd: int, key: str, wait_seconds: float, log) -> None:
    """Take the build lock, waiting at most wait_seconds for whoever holds it; EnvironmentBusy after that."""
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not announced:
            log.info("waiting for another job to build the package environment", extra={"environment": key})
            announced = True
        if time.monotonic() >= deadline:
            raise EnvironmentBusy(
                f"waited {wait_seconds:.0f} s for another job building the package environment {key}; it has "
                "not finished, so this job will be tried again later"
            )
        time.sleep(LOCK_POLL_SECONDS)


def _python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def _raise_recent_failure(record: Path) -> None:
    try:
        failure = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if time.time() - float(failure.get("at", 0)) < FAILED_BUILD_REUSE_SECONDS:
        raise EnvironmentBuildError(str(failure.get("error")))
    record.unlink(missing_ok=True)  # old: the index may have been fixed since, try again


def _build(envs_dir: Path, key: str, requirements: str) -> None:
    for stale in envs_dir.glob(f".{key}.tmp-*"):  # a build killed half-way (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = envs_dir / f".{key}.tmp-{os.getpid()}"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True,
                       capture_output=True, timeout=120)
        purelib = Path(subprocess.run(
            [str(_python(tmp)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip())
        purelib.mkdir(parents=True, exist_ok=True)
        (purelib / BASE_PTH_NAME).write_text(_base_pth(), encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements + "\n", encoding="utf-8")
        (tmp / "constraints.txt").write_text(base_constraints(), encoding="utf-8")
        command = [str(_python(tmp)), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
                   "-r", str(tmp / "requirements.txt"), "-c", str(tmp / "constraints.txt"),
                   *shlex.split(os.environ.get(PIP_ARGS_ENV, ""))]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS,
                                    stdin=subprocess.DEVNULL)
            output, failed = (result.stdout + result.stderr), result.returncode != 0
        except subprocess.TimeoutExpired as exc:
            output, failed = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {BUILD_TIMEOUT_SECONDS} s", True
        (tmp / "install.log").write_text(output if isinstance(output, str) else repr(output), encoding="utf-8")
        if failed:
            tail = output[-OUTPUT_TAIL_CHARS:] if isinstance(output, str) else ""
            error = (f"installing the package's requirements failed; fix requirements.txt (every "
                     f"requirement must exist on the index and agree with the instance's torch/NumPy, which "
                     f"are pinned) and deploy again. pip said:\n{tail}")
            _record_failure(envs_dir / f"{key}.failed", error)
            raise EnvironmentBuildError(error)
        (tmp / ".complete").write_text(f"{time.time()}\n", encoding="utf-8")
        os.replace(tmp, envs_dir / key)
    except (OSError, subprocess.SubprocessError) as exc:
        if isinstance(exc, subprocess.CalledProcessError):
            detail = (exc.stderr or b"")[-OUTPUT_TAIL_CHARS:]
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        else:
            detail = str(exc)
        raise EnvironmentBuildError(f"creating the package environment failed: {detail}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _record_failure(record: Path, error: str) -> None:
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"at": time.time(), "error": error}), encoding="utf-8")
    os.replace(tmp, record)


def _base_pth() -> str:
    """Lines that add the base environment's site directories (and their own .pth files) after the venv's."""
    dirs = list(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]))
    return "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs if os.path.isdir(d))


def base_constraints() -> str:
    """name==version for the base environment's torch family and NumPy (see PINNED_PATTERN)."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name and PINNED_PATTERN.match(name):
            pins.setdefault(name, dist.version)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
