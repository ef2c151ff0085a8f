"""`make soak`: 1000+ uploads through the local cloud, 10% of events delivered twice, faults injected, and a
mix of job packages (examples/jobs/edges and tabular beside the default job), the first of them deployed
again in the middle of the burst.

As harsh as AWS where moto is kind: status-index (GSI) reads lag 2 s behind writes, and one AZ refuses
instance starts (InsufficientInstanceCapacity) for 90 s mid-burst.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchworker.local import cloud
from batchworker.local.paths import REPO_ROOT
from batchworker.local.soak import Soak
from batchworker.local.state import LocalOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument("--gsi-lag-seconds", type=float, default=2.0,
                        help="status-index queries answer from a view this old, as AWS GSIs may (0: exact)")
    parser.add_argument("--no-capacity-outage", action="store_true",
                        help="skip the injected InsufficientInstanceCapacity outage in one AZ")
    parser.add_argument("--package", action="append", type=Path, dest="packages", metavar="DIR",
                        help="job package to deploy and upload its sample/ files to (repeat; default: "
                             "examples/jobs/edges and examples/jobs/tabular)")
    args = parser.parse_args()
    packages = args.packages or [REPO_ROOT / "examples" / "jobs" / name for name in ("edges", "tabular")]
    console = Console()
    local_dir = Path(os.environ.get("BATCHWORKER_LOCAL_DIR") or REPO_ROOT / ".local-cloud") / "soak"
    options = LocalOptions(boot_delay_seconds=1, schedule_speedup=20, idle_grace_seconds=10, instance_count=2,
                           max_jobs_per_instance=2, job_lease_seconds=60, gsi_lag_seconds=args.gsi_lag_seconds)
    cloud.up(local_dir, options, progress=lambda phase: console.print(f"  local cloud: {phase}"))
    try:
        report = Soak(local_dir).run(args.uploads, capacity_outage=not args.no_capacity_outage, packages=packages)
    finally:
        cloud.down(local_dir)
    table = Table(title=f"soak: {args.uploads} uploads + bad inputs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in report.rows():
        table.add_row(name, value)
    console.print(table)
    for failure in report.unexpected_failures[:10]:
        console.print(f"[red]unexpected failure[/red] {failure}")
    ok = not report.lost and report.duplicate_runs == 0 and not report.unexpected_failures and set(
        report.instance_states) == {"stopped"} and report.stops_under_placed_jobs == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
