"""`batchworker simulate --load`: AWS API calls per second per component at 1x-1000x, today vs after issue 15."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchworker.costs.load import Deployment, Workload, levels, model, per_job_calls

out = Console(width=160)
API_COLUMNS = ("ec2:DescribeInstances", "ec2:StartInstances", "dynamodb:status-index hot partition writes",
               "dynamodb:status-index reads (RCU)", "lambda:concurrent executions")


def add_arguments(p) -> None:
    p.add_argument("--load", action="store_true",
                   help="instead of costs: AWS API calls per second per component vs the published limits")
    p.add_argument("--uploads-per-minute", type=float, help="with --load: one workload at this rate")
    p.add_argument("--burst", type=int, default=0, help="with --load: one burst of this many uploads")
    p.add_argument("--job-seconds", type=float, default=12.5, help="with --load: GPU seconds per job (default 12.5)")
    p.add_argument("--markdown", action="store_true", help="with --load: the tables as Markdown (docs/scaling.md)")
    p.add_argument("--recorded", type=Path, metavar="FILE",
                   help="with --load: compare the per-job calls with a recording (scripts/record_calls.py)")


def run(args) -> int:
    pool = args.pool_size or Deployment().pool_size
    if args.uploads_per_minute or args.burst:
        workloads = [Workload("given", args.uploads_per_minute or 0.0, args.job_seconds, burst_uploads=args.burst)]
    else:
        workloads = levels()
    today, after = Deployment(version="today", pool_size=min(pool, 20)), Deployment(version="after", pool_size=pool)
    rows = [(w, model(w, today), model(w, after)) for w in workloads]
    recording = json.loads(args.recorded.read_text()) if args.recorded else None
    if args.json:
        print(json.dumps([{"workload": w.name, "today": _json(t), "after": _json(a)} for w, t, a in rows], indent=2))
    elif args.markdown:
        print(markdown(rows, recording))
    else:
        out.print(load_table(rows))
        out.print(breaks_table(rows))
        if recording:
            out.print(recorded_table(recording))
    return 0


def _json(load) -> dict:
    return {
        "uploads_per_second": load.uploads_per_second, "concurrent_jobs": load.concurrent_jobs,
        "instances": load.instances, "calls_per_second": load.calls, "measures": load.measures,
        "pressures": {name: {"per_second": v, "share_of_limit": s} for name, (v, s) in load.pressures().items()},
        "breaks_first": load.breaks_first(),
    }


def _cell(load, name: str) -> str:
    value, share = load.pressures().get(name, (0.0, 0.0))
    return f"{value:,.1f} ({share:.0%})" if value else "-"


def load_table(rows) -> Table:
    table = Table(title="per second, today -> after (share of the published limit)")
    for column in ("workload", "uploads/min", "jobs at once", *API_COLUMNS):
        table.add_column(column, justify="left" if column == "workload" else "right")
    for workload, today, after in rows:
        rate = workload.burst_uploads and f"{workload.burst_uploads:,} in {workload.burst_arrival_seconds:g}s"
        table.add_row(
            workload.name, rate or f"{workload.uploads_per_minute:,.2f}", f"{after.concurrent_jobs:,.1f}",
            *(f"{_cell(today, name)} -> {_cell(after, name)}" for name in API_COLUMNS),
        )
    return table


def breaks_table(rows) -> Table:
    table = Table(title="what breaks first")
    for column in ("workload", "today", "after"):
        table.add_column(column)
    for workload, today, after in rows:
        table.add_row(workload.name, today.breaks_first(), after.breaks_first())
    return table


def recorded_rows(recording: dict) -> tuple[list[str], list[list[str]]]:
    scenarios = [name for name in ("burst", "large_burst", "single") if name in recording]
    columns = ["component", "API", *(
        f"{name}: per job ({recording[name]['jobs']} jobs; reaper per pass, {recording[name]['reaper_passes']})"
        for name in scenarios
    )]
    per = {name: per_job_calls(recording[name]) for name in scenarios}
    keys = sorted({(c, a) for calls in per.values() for c, apis in calls.items() for a in apis})
    rows = [[c, a, *(f"{per[n].get(c, {}).get(a, 0.0):.2f}" for n in scenarios)] for c, a in keys]
    return columns, rows


def recorded_table(recording: dict) -> Table:
    table = Table(title="recorded calls per job (a real local run), by component and API")
    columns, rows = recorded_rows(recording)
    for n, column in enumerate(columns):
        table.add_column(column, justify="right" if n > 1 else "left")
    for row in rows:
        table.add_row(*row)
    return table


def markdown(rows, recording: dict | None) -> str:
    def md(columns, body) -> list[str]:
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *("| " + " | ".join(r) + " |" for r in body)]

    lines = md(["workload", "uploads/min", "jobs at once", *API_COLUMNS], [
        [w.name, (f"{w.burst_uploads:,} in {w.burst_arrival_seconds:g}s" if w.burst_uploads
                  else f"{w.uploads_per_minute:,.2f}"), f"{a.concurrent_jobs:,.1f}",
         *(f"{_cell(t, name)} → {_cell(a, name)}" for name in API_COLUMNS)]
        for w, t, a in rows
    ])
    lines += ["", *md(["workload", "breaks first today", "breaks first after"],
                      [[w.name, t.breaks_first(), a.breaks_first()] for w, t, a in rows])]
    if recording:
        lines += ["", *md(*recorded_rows(recording))]
    return "\n".join(lines)
