"""A job waiting for another job's environment build waits a bounded time, then is retried (not failed)."""

import fcntl
import logging
import os

import pytest

from worker.environments import EnvironmentBusy, ensure_environment, environment_key
from worker.errors import ExitCode


def test_a_build_that_does_not_finish_in_time_makes_the_waiting_job_transient(tmp_path):
    requirements = "some-package==1.0\n"
    envs = tmp_path / "envs"
    envs.mkdir()
    holder = os.open(envs / f"{environment_key(requirements)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # "another job" is building it and never finishes
    try:
        with pytest.raises(EnvironmentBusy) as raised:
            ensure_environment(envs, requirements, logging.getLogger("test"), wait_seconds=0.3)
    finally:
        os.close(holder)
    assert raised.value.exit_code is ExitCode.TRANSIENT
    assert "will be tried again later" in str(raised.value)
    assert not list(envs.glob("*.failed"))  # not recorded as a failed build: the next job builds it


def test_the_waiting_job_takes_over_when_the_builder_gave_up(tmp_path, monkeypatch):
    """The lock holder died without a result: the waiter finds the lock free and builds (here: fails fast
    on an empty index, which proves it got past the lock rather than waiting)."""
    requirements = "x-package-that-does-not-exist==0.0.1\n"
    envs = tmp_path / "envs"
    envs.mkdir()
    monkeypatch.setenv("BATCHWORKER_PIP_ARGS", f"--no-index --find-links {tmp_path}")
    with pytest.raises(Exception) as raised:
        ensure_environment(envs, requirements, logging.getLogger("test"), wait_seconds=0.3)
    assert not isinstance(raised.value, EnvironmentBusy)
    assert "installing the package's requirements failed" in str(raised.value)
