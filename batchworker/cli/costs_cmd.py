"""`batchworker simulate` (what each policy would cost, no AWS) and `batchworker report` (what it cost)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchworker.cli import load_cmd
from batchworker.cli.client import FIELDS, resolve
from batchworker.cli.views import stores
from batchworker.costs.billing import PRICES, CostReport, build_cost_report, job_intervals
from batchworker.costs.simulator import CloudModel, simulate_all
from batchworker.models import utc_now

out = Console()
err = Console(stderr=True)
DEFAULT_INSTANCE_TYPE = "g4dn.xlarge"


def add_parsers(subparsers) -> None:
    """Add `simulate` and `report` to the CLI's subcommands."""
    p = subparsers.add_parser("simulate", help="compare start/stop policies on workload traces (no AWS)")
    p.add_argument("--days", type=_positive_int, default=30, help="days of each trace (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the traces and boot times (default: 0)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--png", type=Path, metavar="FILE", help="draw billed vs busy per policy and trace")
    p.add_argument(
        "--idle-grace-seconds",
        type=_non_negative_float,
        default=120.0,
        help="this system's idle grace: the cap of the adaptive grace, the whole grace of batchworker-fixed (default: 120)",
    )
    p.add_argument(
        "--pool-size", type=_positive_int, help="instances in this system's pool (default: 1; with --load, 20)"
    )
    p.add_argument(
        "--concurrency-per-instance",
        type=_positive_int,
        default=1,
        help="jobs at once per instance for this system and always-on (default: 1)",
    )
    p.add_argument("--instance-type", choices=sorted(PRICES), default=DEFAULT_INSTANCE_TYPE)
    load_cmd.add_arguments(p)
    p.set_defaults(command=cmd_simulate)

    p = subparsers.add_parser("report", help="billed vs busy instance-seconds and cost of this deployment")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--png", type=Path, metavar="FILE", help="draw a timeline of instances and jobs")
    p.add_argument("--instance-type", help="price as this type (default: the pool's own type)")
    p.add_argument(
        "--hourly-price-dollars",
        type=_non_negative_float,
        help="price per instance-hour (default: the on-demand us-east-1 price of the type)",
    )
    p.set_defaults(command=cmd_report)


def cmd_simulate(args) -> int:
    if args.load:
        return load_cmd.run(args)
    result = simulate_all(
        days=args.days,
        seed=args.seed,
        idle_grace_seconds=args.idle_grace_seconds,
        pool_size=args.pool_size or 1,
        concurrency_per_instance=args.concurrency_per_instance,
        model=CloudModel(instance_type=args.instance_type),
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        wide_console().print(simulation_table(result))
        for line in headline_lines(result):
            out.print(line)
    if args.png:
        from batchworker.costs.plots import plot_comparison

        plot_comparison(result, args.png)
        err.print(f"wrote {args.png}")
    return 0


def cmd_report(args) -> int:
    deployment = resolve({name: getattr(args, name, None) for name in FIELDS})
    job_store, pool = stores(deployment)
    instances = pool.list()
    events = [event for instance in instances for event in pool.history.events(instance.instance_id)]
    intervals = job_intervals(job_store.all())
    instance_type = args.instance_type or next(
        (instance.instance_type for instance in instances if instance.instance_type), DEFAULT_INSTANCE_TYPE
    )
    report = build_cost_report(events, intervals, utc_now(), instance_type, args.hourly_price_dollars)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render_report(report, wide_console())
    if args.png:
        from batchworker.costs.plots import plot_timeline

        plot_timeline(report, intervals, args.png)
        err.print(f"wrote {args.png}")
    return 0


def simulation_rows(result: dict) -> list[list[str]]:
    """trace, policy, billed s, busy s, billed/busy, limit s, billed/limit, p95 latency, $/day."""
    rows = []
    for name, trace in result["traces"].items():
        for policy, m in trace["policies"].items():
            rows.append(
                [
                    name,
                    policy,
                    f"{m['billed_seconds']:,}",
                    f"{m['busy_seconds']:,.0f}",
                    f"{m['billed_over_busy']:.2f}",
                    f"{m['limit_seconds']:,.0f}",
                    f"{m['billed_over_limit']:.3f}",
                    duration_text(m["p95_latency_seconds"]),
                    f"{m['dollars_per_day']:.2f}",
                ]
            )
    return rows


SIMULATION_COLUMNS = (
    "trace",
    "policy",
    "billed s",
    "busy s",
    "billed/busy",
    "limit s",
    "billed/limit",
    "p95 latency",
    "$/day",
)


def simulation_table(result: dict) -> Table:
    p = result["parameters"]
    table = Table(
        title=(
            f"{p['days']} days, seed {p['seed']}, {p['instance_type']} ${p['hourly_price_dollars']}/h, "
            f"boot {p['boot_seconds_range'][0]:g}-{p['boot_seconds_range'][1]:g} s, idle grace at most "
            f"{p['idle_grace_seconds']:g} s, pool {p['pool_size']}"
        )
    )
    for column in SIMULATION_COLUMNS:
        table.add_column(column, justify="left" if column in ("trace", "policy") else "right")
    previous = None
    for row in simulation_rows(result):
        table.add_row(*([row[0] if row[0] != previous else ""] + row[1:]))
        previous = row[0]
    return table


def headline_lines(result: dict) -> list[str]:
    h = result["headline"]
    lines = []
    if "sim_seed_billed_over_limit" in h:
        verdict = "met" if h["sim_seed_met"] else "MISSED"
        lines.append(
            f"sim_seed_billed_over_limit = {h['sim_seed_billed_over_limit']:.3f}  "
            f"(goal <= {h['sim_seed_goal']}: {verdict})"
        )
    if "sim_bursty_billed_over_busy" in h:
        verdict = "met" if h["sim_bursty_met"] else "MISSED"
        lines.append(
            f"sim_bursty_billed_over_busy = {h['sim_bursty_billed_over_busy']:.3f}  "
            f"(goal <= {h['sim_bursty_goal']} and < original's "
            f"{h['sim_bursty_original_billed_over_busy']:.3f}: {verdict})"
        )
    return lines


def render_report(report: CostReport, console: Console) -> None:
    table = Table(title=f"instances ({report.instance_type}, ${report.hourly_price_dollars}/h)")
    for column in ("instance", "starts", "running s", "billed s", "busy s", "utilization", "state"):
        table.add_column(column, justify="left" if column in ("instance", "state") else "right", no_wrap=True)
    for usage in report.instances:
        table.add_row(
            usage.instance_id,
            str(usage.starts),
            f"{usage.running_seconds:,.0f}",
            f"{usage.billed_seconds:,}",
            f"{usage.busy_seconds:,.0f}",
            f"{usage.busy_seconds / usage.billed_seconds:.0%}" if usage.billed_seconds else "-",
            "running" if usage.still_running else "stopped",
        )
    console.print(table)
    console.print(f"billed instance-seconds  {report.billed_seconds:,} (per second, 60 s minimum per start)")
    console.print(
        f"busy seconds             {report.busy_seconds:,.0f} (jobs running..finished, see docs/simulator.md)"
    )
    console.print(f"utilization              {report.utilization:.1%}")
    console.print(f"cost                     ${report.cost_dollars:,.2f}")
    console.print(
        f"always-on 9-to-5         ${report.always_on_cost_dollars:,.2f} over {report.days} day(s) "
        f"({report.always_on_billed_seconds:,} s)"
    )
    console.print(f"saving                   ${report.saving_dollars:,.2f} ({report.saving_fraction:.0%})")


def wide_console() -> Console:
    """The terminal as it is; when stdout is a file or a pipe, wide enough for a table row on one line."""
    return out if out.is_terminal else Console(width=140)


def duration_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value
