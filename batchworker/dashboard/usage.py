"""Billed and busy time of each instance in a time window, from `costs.billing`, shaped for timeline rows."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from batchworker.costs.billing import (
    CostReport,
    JobInterval,
    RunningInterval,
    build_cost_report,
    instance_intervals,
    job_intervals,
)
from batchworker.dashboard.job_index import JobRow
from batchworker.models import Instance, Job, JobStatus, isoformat, parse_time

TIMELINE_WIDTH = 1000  # SVG user units of a row


def as_jobs(rows: Iterable[JobRow]) -> list[Job]:
    """The billing code's `Job`s for dashboard rows (what `batchworker report` feeds it)."""
    return [
        Job(row.job_id, JobStatus(row.status), row.input_bucket, row.input_key, instance_id=row.instance_id,
            created_at=row.created_at, updated_at=row.updated_at, running_since=row.running_since)
        for row in rows
    ]


def events_in_window(events: Iterable[Mapping], start: datetime) -> list[dict]:
    """Start/stop events from `start` on; an instance already running at `start` gets a start there.

    So billing counts only the part of a run inside the window (a run cut by the window's edge still gets the
    per-start minimum: a small overstatement for runs under a minute that straddle it).
    """
    by_instance: dict[str, list[Mapping]] = {}
    for event in events:
        by_instance.setdefault(event["instance_id"], []).append(event)
    clipped = []
    for instance_id, history in by_instance.items():
        history = sorted(history, key=lambda e: (e["at"], e["state"] != "stop"))
        before = [e for e in history if parse_time(e["at"]) < start]
        if before and before[-1]["state"] == "start":
            clipped.append({"instance_id": instance_id, "at": isoformat(start), "state": "start"})
        clipped.extend(dict(e) for e in history if parse_time(e["at"]) >= start)
    return clipped


@dataclass(frozen=True)
class Span:
    x: float
    width: float
    start: datetime
    end: datetime
    label: str


@dataclass(frozen=True)
class InstanceRow:
    instance_id: str
    state: str
    instance_type: str
    last_stop_at: str | None
    last_stop_reason: str | None
    running: list[Span]
    waiting: list[Span]
    busy: list[Span]
    ongoing: list[Span]
    billed_seconds: int
    busy_seconds: float
    starts: int


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    rows: list[InstanceRow]
    report: CostReport
    ticks: list[tuple[float, str]]


def build_timeline(
    instances: list[Instance],
    events: list[dict],
    jobs: list[JobRow],
    now: datetime,
    start: datetime,
    instance_type: str,
    hourly_price_dollars: float,
) -> Timeline:
    """One row per instance from `start` to `now`: running spans, the busy spans (jobs) inside them."""
    window = events_in_window(events, start)
    busy_jobs = job_intervals(as_jobs(jobs))
    waiting, working, ongoing = _job_phases(jobs, now)
    report = build_cost_report(window, busy_jobs, now, instance_type, hourly_price_dollars)
    usage = {u.instance_id: u for u in report.instances}
    intervals = instance_intervals(window, now)
    scale = _Scale(start, now)
    rows = []
    for instance in instances:
        own = [i for i in intervals if i.instance_id == instance.instance_id]
        stops = [e for e in events if e["instance_id"] == instance.instance_id and e["state"] == "stop"]
        last_stop = max(stops, key=lambda e: e["at"]) if stops else None
        u = usage.get(instance.instance_id)
        rows.append(
            InstanceRow(
                instance_id=instance.instance_id,
                state=instance.state.value,
                instance_type=instance.instance_type,
                last_stop_at=last_stop["at"] if last_stop else None,
                last_stop_reason=(last_stop.get("reason") or None) if last_stop else None,
                running=[scale.span(i.start, i.end, "running" + (" (still)" if i.still_running else "")) for i in own],
                waiting=coalesce([scale.span(s, e, label) for s, e, label in _clip(waiting, own)]),
                busy=coalesce([scale.span(s, e, label) for s, e, label in _clip(working, own)]),
                ongoing=coalesce([scale.span(s, e, label) for s, e, label in _clip(ongoing, own)]),
                billed_seconds=u.billed_seconds if u else 0,
                busy_seconds=u.busy_seconds if u else 0.0,
                starts=u.starts if u else 0,
            )
        )
    return Timeline(start, now, rows, report, scale.ticks())


def fit_window_start(events: list[dict], now: datetime, hours: float | None) -> datetime:
    """`hours` back from now; without it, from the first run of the last day (a little padding before it)."""
    if hours:
        return now - timedelta(hours=hours)
    day_ago = now - timedelta(days=1)
    starts = [i.start for i in instance_intervals(events_in_window(events, day_ago), now)]
    if not starts:
        return now - timedelta(hours=1)
    first = min(starts)
    return max(day_ago, first - max(timedelta(seconds=5), (now - first) * 0.03))


def _job_phases(jobs: list[JobRow], now: datetime) -> tuple[list[JobInterval], ...]:
    """(waiting, working, still working) intervals of each job on its instance, for drawing.

    Waiting is from queued until the job's code started (`running_since`: the boot, a free slot); working is
    what billing counts as busy (`job_intervals`).
    """
    waiting, working, ongoing = [], [], []
    for row in jobs:
        if not row.instance_id or not row.created_at:
            continue
        queued = parse_time(row.created_at)
        started = parse_time(row.running_since) if row.running_since else None
        end = parse_time(row.updated_at) if row.is_terminal and row.updated_at else now
        if started:
            waiting.append(JobInterval(row.job_id, row.instance_id, queued, started))
        (working if row.is_terminal else ongoing if started else waiting).append(
            JobInterval(row.job_id, row.instance_id, started or queued, end)
        )
    return waiting, working, ongoing


def _clip(jobs: list[JobInterval], running: list[RunningInterval]) -> list[tuple[datetime, datetime, str]]:
    """Each job interval clipped to its instance's running intervals (as billing counts busy time)."""
    runs = sorted(running, key=lambda run: run.start)
    ends = [run.end for run in runs]  # runs of one instance are disjoint: their ends are sorted too
    spans = []
    for job in jobs:
        index = bisect.bisect_right(ends, job.start)
        while index < len(runs) and runs[index].start < job.end:
            run = runs[index]
            if job.instance_id == run.instance_id:
                start, end = max(job.start, run.start), min(job.end, run.end)
                if end > start:
                    spans.append((start, end, job.job_id))
            index += 1
    return spans


def coalesce(spans: list[Span], gap: float = 1.0) -> list[Span]:
    """Spans closer than `gap` units drawn as one (a month of jobs is more rectangles than pixels)."""
    merged: list[Span] = []
    count = 0
    for span in sorted(spans, key=lambda s: s.x):
        if merged and span.x <= merged[-1].x + merged[-1].width + gap:
            last = merged[-1]
            count += 1
            end_x = max(last.x + last.width, span.x + span.width)
            merged[-1] = Span(last.x, round(end_x - last.x, 2), last.start, max(last.end, span.end), f"{count} jobs")
        else:
            count = 1
            merged.append(span)
    return merged


class _Scale:
    def __init__(self, start: datetime, end: datetime):
        self.start = start
        self.seconds = max(1.0, (end - start).total_seconds())

    def x(self, moment: datetime) -> float:
        offset = (moment - self.start).total_seconds() / self.seconds
        return round(min(1.0, max(0.0, offset)) * TIMELINE_WIDTH, 2)

    def span(self, start: datetime, end: datetime, label: str) -> Span:
        x = self.x(start)
        return Span(x, max(0.5, round(self.x(end) - x, 2)), start, end, label)

    def ticks(self, count: int = 6) -> list[tuple[float, str]]:
        fmt = "%H:%M:%S" if self.seconds < 3 * 3600 else ("%H:%M" if self.seconds < 2 * 86400 else "%m-%d %H:%M")
        return [
            (round(TIMELINE_WIDTH * n / count, 2), (self.start + timedelta(seconds=self.seconds * n / count)).strftime(fmt))
            for n in range(count + 1)
        ]
