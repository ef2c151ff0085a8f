"""The cost page: billed vs busy GPU time for today, 7 and 30 days, against always-on 9-17 and start-per-upload.

The deployment's own numbers come from `costs.billing` (as `batchworker report`); the start-per-upload
pattern is the cost simulator's `original` policy replayed on this deployment's own jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from batchworker.costs import policies
from batchworker.costs.billing import build_cost_report, cost_dollars, job_intervals
from batchworker.costs.simulator import CloudModel, run_policy
from batchworker.costs.traces import Trace, TraceJob
from batchworker.dashboard.job_index import JobRow
from batchworker.dashboard.usage import as_jobs, events_in_window
from batchworker.models import parse_time

WINDOWS = (("today", 1), ("7 days", 7), ("30 days", 30))


@dataclass(frozen=True)
class CostWindow:
    name: str
    days: int
    jobs: int
    starts: int
    billed_gpu_hours: float
    busy_gpu_hours: float
    utilization: float
    cost_dollars: float
    always_on_dollars: float
    per_upload_dollars: float
    per_upload_billed_gpu_hours: float
    per_upload_starts: int


def cost_windows(
    events: list[dict], jobs: list[JobRow], now: datetime, instance_type: str, hourly_price_dollars: float
) -> list[CostWindow]:
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    windows = []
    for name, days in WINDOWS:
        start = midnight - timedelta(days=days - 1)
        own = [row for row in jobs if row.created_at and parse_time(row.created_at) >= start]
        report = build_cost_report(
            events_in_window(events, start), job_intervals(as_jobs(own)), now, instance_type, hourly_price_dollars,
            days=days,
        )
        per_upload = run_policy(
            jobs_as_trace(own, start, days), policies.original(), CloudModel(instance_type=instance_type), seed=0,
            limit_seconds=0.0,  # the physical limit is the simulator's reference; this page does not show it
        )
        windows.append(
            CostWindow(
                name=name,
                days=days,
                jobs=len(own),
                starts=report.starts,
                billed_gpu_hours=report.billed_seconds / 3600,
                busy_gpu_hours=report.busy_seconds / 3600,
                utilization=report.utilization,
                cost_dollars=report.cost_dollars,
                always_on_dollars=report.always_on_cost_dollars,
                per_upload_dollars=cost_dollars(per_upload.billed_seconds, hourly_price_dollars),
                per_upload_billed_gpu_hours=per_upload.billed_seconds / 3600,
                per_upload_starts=per_upload.starts,
            )
        )
    return windows


def jobs_as_trace(rows: list[JobRow], start: datetime, days: int) -> Trace:
    """Finished jobs as a simulator trace: arrival at queueing, duration from running to finished."""
    trace_jobs = []
    for row in rows:
        if not row.is_terminal or not row.updated_at:
            continue
        began = parse_time(row.running_since or row.created_at)
        duration = (parse_time(row.updated_at) - began).total_seconds()
        if duration > 0:
            arrival = (parse_time(row.created_at) - start).total_seconds()
            trace_jobs.append(TraceJob(arrival, duration))
    trace_jobs.sort(key=lambda job: job.arrival_seconds)
    return Trace("deployment", days, "this deployment's finished jobs", tuple(trace_jobs))
