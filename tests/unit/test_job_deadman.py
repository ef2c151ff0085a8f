"""worker.deadman: when the instance powers itself off, and the `batchworker-job deadman` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker import cli
from worker.deadman import Deadman, push_deadman, read_deadman, running_job_pids, should_power_off

NOW = 1_800_000_000.0
EXPIRED = Deadman(expires_at=NOW - 1, idle_shutdown_seconds=600)


@pytest.mark.parametrize(
    ("timer", "uptime", "running", "expected"),
    [
        (EXPIRED, 3600.0, [], True),
        (Deadman(NOW - 1, None), None, [], True),  # no idle length or uptime known: the expiry decides
        (None, 3600.0, [], False),  # no job ever ran here
        (Deadman(NOW + 1, 600), 3600.0, [], False),  # a job started or ended recently
        (EXPIRED, 3600.0, [4242], False),  # a job runs longer than the idle period
        (EXPIRED, 599.0, [], False),  # a fresh boot: its job is on its way
    ],
)
def test_should_power_off(timer, uptime, running, expected):
    assert should_power_off(timer, NOW, uptime, running) is expected


def test_push_then_read(tmp_path):
    push_deadman(tmp_path / "jobs", 30, now=NOW)
    assert read_deadman(tmp_path / "jobs") == Deadman(NOW + 30, 30)
    assert json.loads((tmp_path / "jobs" / ".deadman").read_text()) == {
        "expires_at": NOW + 30, "idle_shutdown_seconds": 30
    }
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == [".deadman"]  # no temporary file left


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"expires_at": "soon"}', b'{"expires_at": NaN}'])
def test_unreadable_timer_is_no_timer(tmp_path, content):
    (tmp_path / ".deadman").write_bytes(content)
    assert read_deadman(tmp_path) is None


def test_running_job_pids_are_live_job_processes(tmp_path):
    job = subprocess.Popen(  # stands in for `python -m worker.cli run ...`
        [sys.executable, "-c", "import time; time.sleep(30)", "worker.cli"], stdout=subprocess.DEVNULL
    )
    other = subprocess.Popen(["sleep", "30"])
    try:
        for n, pid in enumerate((job.pid, other.pid, 999_999_999)):
            (tmp_path / f"j-{n:016x}").mkdir()
            (tmp_path / f"j-{n:016x}" / "run.pid").write_text(f"{pid}\n")
        (tmp_path / "j-000000000000000f").mkdir()
        (tmp_path / "j-000000000000000f" / "run.pid").write_text("garbage")
        assert running_job_pids(tmp_path) == [job.pid]
        # a job the process finished (run.done names it) does not count: it may idle as a warm server
        (tmp_path / "j-0000000000000000" / "run.done").write_text(f"{job.pid}\n")
        assert running_job_pids(tmp_path) == []
        (tmp_path / "j-0000000000000000" / "run.done").write_text("1\n")  # an earlier run's
        assert running_job_pids(tmp_path) == [job.pid]
        job.kill()
        job.wait(5)
        assert running_job_pids(tmp_path) == []
    finally:
        for process in (job, other):
            process.kill()
            process.wait(5)


def test_deadman_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "uptime_seconds", lambda: 3600.0)  # up for an hour
    # GIVEN no timer THEN alive
    assert cli.deadman(tmp_path) == 1
    assert capsys.readouterr().out == "alive\n"
    # GIVEN a timer in the future THEN alive
    push_deadman(tmp_path, 60)
    assert cli.deadman(tmp_path) == 1
    assert capsys.readouterr().out == "alive\n"
    # GIVEN it ran out THEN expired
    push_deadman(tmp_path, 60, now=time.time() - 61)
    assert cli.deadman(tmp_path) == 0
    assert capsys.readouterr().out == "expired\n"


def test_deadman_console_script(tmp_path):
    command = [str(Path(sys.executable).with_name("batchworker-job")), "deadman"]
    env = {**os.environ, "BATCHWORKER_JOB_ROOT": str(tmp_path)}
    result = subprocess.run(command, env=env, capture_output=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, b"alive\n")
