"""`batchworker local up`, then `local down` and `local up` again at once, N times: the real commands, timed.

Run in the background by tests/integration/conftest.py while the other integration tests run (each `up` is
mostly Terraform waiting on the AWS provider's propagation timers), checked by test_restart.py at the end.
Writes a JSON report: one entry per command, with its exit code, seconds and the tail of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from batchworker.local import processes
from batchworker.local.state import read_state

CLI = str(Path(sys.executable).parent / "batchworker")


def run(report: list[dict], env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600, env=env)
    report.append({"command": " ".join(args), "code": result.returncode, "seconds": time.monotonic() - started,
                   "output": (result.stdout + result.stderr)[-2000:]})
    return result


def cycles(local_dir: Path, count: int) -> list[dict]:
    env = {**os.environ, "BATCHWORKER_LOCAL_DIR": str(local_dir)}
    report: list[dict] = []
    cloud_ids = []
    try:
        for n in range(count + 1):
            if n and run(report, env, "local", "down").returncode != 0:
                break
            if run(report, env, "local", "up", "--boot-delay-seconds", "1").returncode != 0:
                break
            cloud_ids.append(read_state(local_dir)["cloud_id"])
            # The new cloud answers: its tables and instances, through the CLI's own lookup of the local cloud.
            if run(report, env, "status", "--json").returncode != 0:
                break
    finally:
        run(report, env, "local", "down")
    left = [pid for cloud_id in cloud_ids for pid in processes.processes_marked(cloud_id)]
    report.append({"command": "leftover processes", "code": 1 if left else 0, "seconds": 0.0, "output": str(left)})
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local-dir", type=Path, required=True)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    report = cycles(args.local_dir, args.cycles)
    args.report.write_text(json.dumps(report, indent=2))
    return 0 if all(entry["code"] == 0 for entry in report) else 1


if __name__ == "__main__":
    sys.exit(main())
