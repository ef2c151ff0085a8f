"""`batchworker local down` and then `local up` at once, three times in a row (the cycles run in the background:
tests/integration/restart_cycles.py, started by conftest.py; this test runs last and checks them)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.conftest import RESTART_CYCLES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_local_down_then_up_at_once_three_times(request):
    process, work = request.config.stash[RESTART_CYCLES]
    try:
        code = process.wait(timeout=840)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"restart cycles still running after 840 s:\n{(work / 'cycles.log').read_text()[-3000:]}")
    report = json.loads((work / "report.json").read_text())
    failed = [entry for entry in report if entry["code"] != 0]
    assert code == 0 and not failed, f"failed: {json.dumps(failed, indent=2)}"
    commands = [entry["command"] for entry in report]
    # up, then down + up three times, each followed by a status call, then the last down
    assert commands.count("local up --boot-delay-seconds 1") == 4
    assert commands.count("local down") == 4
    downs = [n for n, entry in enumerate(report[:-2]) if entry["command"] == "local down"]  # not the last one
    assert all(report[n + 1]["command"].startswith("local up") for n in downs), "each down is followed by an up"
