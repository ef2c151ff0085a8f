"""EC2 billing arithmetic over an instance's start/stop history and its jobs: pure functions, `now` passed in.

Times are ISO-8601 UTC strings ending in `Z` on input (the tables' format) and aware datetimes inside.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from batchworker.errors import ConfigurationError
from batchworker.models import Job, JobStatus, parse_time

# On-demand Linux prices in us-east-1, dollars per instance-hour.
# Source: https://aws.amazon.com/ec2/pricing/on-demand/ (g4dn.xlarge: 1 NVIDIA T4 16 GB, 4 vCPU;
# g5.xlarge: 1 NVIDIA A10G 24 GB, 4 vCPU), as quoted in issue 5. Prices change: check before relying on them.
PRICES: dict[str, float] = {
    "g4dn.xlarge": 0.526,
    "g5.xlarge": 1.006,
}
# EBS gp3 storage in us-east-1, dollars per GB-month. Source: https://aws.amazon.com/ebs/pricing/.
# A volume bills in every instance state, running or stopped (EC2 User Guide, "Instance state changes":
# the billing column covers instance usage only; EBS volumes are charged whatever the instance's state).
EBS_GP3_DOLLARS_PER_GB_MONTH = 0.08
# AWS prices a month as 730 hours (the convention of the AWS Pricing Calculator).
HOURS_PER_MONTH = 730.0
# "Every time you start your instance, Amazon EC2 charges a one-minute minimum for instance usage, and
# thereafter charges per second" (EC2 API Reference, StopInstances). We round each run up to whole seconds.
MINIMUM_BILLED_SECONDS = 60
# The pattern we compare against: one instance on from 09:00 to 17:00 every day.
ALWAYS_ON_SECONDS_PER_DAY = 8 * 3600


@dataclass(frozen=True)
class RunningInterval:
    """One run of an instance: from a start request to the next stop request (or `now` if still running)."""

    instance_id: str
    start: datetime
    end: datetime
    still_running: bool = False

    @property
    def running_seconds(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds())


@dataclass(frozen=True)
class JobInterval:
    """When a job kept an instance busy (see `batchworker report` for how it is read from the job table)."""

    job_id: str
    instance_id: str | None
    start: datetime
    end: datetime


@dataclass(frozen=True)
class InstanceUsage:
    instance_id: str
    starts: int
    running_seconds: float
    billed_seconds: int
    busy_seconds: float
    still_running: bool


@dataclass(frozen=True)
class CostReport:
    instance_type: str
    hourly_price_dollars: float
    days: int
    starts: int
    running_seconds: float
    billed_seconds: int
    busy_seconds: float
    utilization: float
    cost_dollars: float
    always_on_billed_seconds: int
    always_on_cost_dollars: float
    saving_dollars: float
    saving_fraction: float
    instances: tuple[InstanceUsage, ...]
    intervals: tuple[RunningInterval, ...]

    def to_json(self) -> dict:
        return {
            "instance_type": self.instance_type,
            "hourly_price_dollars": self.hourly_price_dollars,
            "days": self.days,
            "starts": self.starts,
            "running_seconds": round(self.running_seconds, 3),
            "billed_seconds": self.billed_seconds,
            "busy_seconds": round(self.busy_seconds, 3),
            "utilization": round(self.utilization, 4),
            "cost_dollars": round(self.cost_dollars, 4),
            "always_on_billed_seconds": self.always_on_billed_seconds,
            "always_on_cost_dollars": round(self.always_on_cost_dollars, 4),
            "saving_dollars": round(self.saving_dollars, 4),
            "saving_fraction": round(self.saving_fraction, 4),
            "instances": [
                {
                    "instance_id": usage.instance_id,
                    "starts": usage.starts,
                    "running_seconds": round(usage.running_seconds, 3),
                    "billed_seconds": usage.billed_seconds,
                    "busy_seconds": round(usage.busy_seconds, 3),
                    "still_running": usage.still_running,
                }
                for usage in self.instances
            ],
        }


def instance_intervals(events: Iterable[Mapping], now: datetime) -> list[RunningInterval]:
    """Pair each `start` with the next `stop` of its instance; a run without a stop is billed up to `now`.

    Events are `{instance_id, at, state: "start"|"stop"}`, in any order. A `start` while already running
    (a repeated request) and a `stop` while not running (a repeated stop, or history that begins with a
    stop) change nothing: EC2 bills a running instance once.
    """
    by_instance: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for event in events:
        by_instance[event["instance_id"]].append((_as_time(event["at"]), event["state"]))
    intervals = []
    for instance_id, history in sorted(by_instance.items()):
        started: datetime | None = None
        # At equal times a stop sorts before a start: a stop and a restart in one millisecond are two runs.
        for at, state in sorted(history, key=lambda item: (item[0], item[1] != "stop")):
            if state == "start" and started is None:
                started = at
            elif state == "stop" and started is not None:
                intervals.append(RunningInterval(instance_id, started, at))
                started = None
        if started is not None:
            intervals.append(RunningInterval(instance_id, started, max(started, now), still_running=True))
    return intervals


def billed_seconds_for_run(running_seconds: float, minimum_seconds: int = MINIMUM_BILLED_SECONDS) -> int:
    """Per-second billing of one run: whole seconds, rounded up, and never less than the minimum."""
    return max(minimum_seconds, math.ceil(round(running_seconds, 3)))  # the tables keep milliseconds


def billed_seconds(
    intervals: Iterable[RunningInterval], minimum_seconds: int = MINIMUM_BILLED_SECONDS
) -> int:
    return sum(billed_seconds_for_run(interval.running_seconds, minimum_seconds) for interval in intervals)


def busy_seconds(jobs: Iterable[JobInterval], intervals: Iterable[RunningInterval]) -> float:
    """Seconds during which at least one job was on a running instance.

    Per instance: the union of its jobs' intervals (two overlapping jobs count once), clipped to the
    instance's running intervals. Jobs without an instance are not counted.
    """
    return sum(_busy_by_instance(jobs, intervals).values())


def utilization(busy: float, billed: float) -> float:
    return busy / billed if billed > 0 else 0.0


def cost_dollars(billed: float, hourly_price_dollars: float) -> float:
    return billed / 3600.0 * hourly_price_dollars


def ebs_dollars(volume_gb: float, seconds: float) -> float:
    """What a gp3 volume of `volume_gb` costs over `seconds`, whatever the instance's state."""
    return volume_gb * EBS_GP3_DOLLARS_PER_GB_MONTH * seconds / (HOURS_PER_MONTH * 3600.0)


def days_covered(start: datetime, end: datetime) -> int:
    """Calendar days (UTC) from `start`'s date to `end`'s date, both included."""
    first: date = start.date()
    last: date = max(start, end).date()
    return (last - first).days + 1


def always_on_billed_seconds(days: int, seconds_per_day: int = ALWAYS_ON_SECONDS_PER_DAY) -> int:
    """One instance on 09:00-17:00 on each of `days` days: one run a day, so the minimum never applies."""
    return days * seconds_per_day


def build_cost_report(
    events: Iterable[Mapping],
    jobs: Iterable[JobInterval],
    now: datetime,
    instance_type: str,
    hourly_price_dollars: float | None = None,
    days: int | None = None,
) -> CostReport:
    """Billed and busy seconds, cost, and the saving against one always-on 9-to-5 instance over the same days.

    `days` defaults to the calendar days from the first recorded event to `now`, every day counted as a
    working day. `hourly_price_dollars` defaults to `PRICES[instance_type]`.
    """
    price = hourly_price_dollars if hourly_price_dollars is not None else price_of(instance_type)
    intervals = instance_intervals(events, now)
    jobs = list(jobs)
    busy_by_instance = _busy_by_instance(jobs, intervals)
    usages = []
    for instance_id in sorted({interval.instance_id for interval in intervals}):
        own = [interval for interval in intervals if interval.instance_id == instance_id]
        usages.append(
            InstanceUsage(
                instance_id,
                starts=len(own),
                running_seconds=sum(interval.running_seconds for interval in own),
                billed_seconds=billed_seconds(own),
                busy_seconds=busy_by_instance.get(instance_id, 0.0),
                still_running=any(interval.still_running for interval in own),
            )
        )
    if days is None:
        days = days_covered(min(interval.start for interval in intervals), now) if intervals else 0
    billed = sum(usage.billed_seconds for usage in usages)
    busy = sum(usage.busy_seconds for usage in usages)
    cost = cost_dollars(billed, price)
    always_on = always_on_billed_seconds(days)
    always_on_cost = cost_dollars(always_on, price)
    return CostReport(
        instance_type=instance_type,
        hourly_price_dollars=price,
        days=days,
        starts=len(intervals),
        running_seconds=sum(usage.running_seconds for usage in usages),
        billed_seconds=billed,
        busy_seconds=busy,
        utilization=utilization(busy, billed),
        cost_dollars=cost,
        always_on_billed_seconds=always_on,
        always_on_cost_dollars=always_on_cost,
        saving_dollars=always_on_cost - cost,
        saving_fraction=(1.0 - cost / always_on_cost) if always_on_cost > 0 else 0.0,
        instances=tuple(usages),
        intervals=tuple(intervals),
    )


def price_of(instance_type: str) -> float:
    try:
        return PRICES[instance_type]
    except KeyError:
        raise ConfigurationError(
            f"no price for instance type {instance_type!r}: use one of {', '.join(sorted(PRICES))} "
            "or give the hourly price (--hourly-price-dollars)"
        ) from None


def job_intervals(jobs: Iterable[Job]) -> list[JobInterval]:
    """Busy intervals from the job table: `running_since`..`updated_at` of each finished job with an instance.

    `running_since` is set when the job's code starts (its slot taken, its turn in the batch); a row without
    it (written before it existed) starts at `created_at`, which includes the wait for the boot. `updated_at`
    of a SUCCEEDED/FAILED job is when the stop function recorded the manifest, a little after the job ended,
    so busy seconds are a slight upper bound (clipping to the running intervals removes anything outside).
    """
    found = []
    for job in jobs:
        if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED) and job.instance_id and job.created_at:
            start = _as_time(job.running_since or job.created_at)
            end = _as_time(job.updated_at or job.created_at)
            found.append(JobInterval(job.job_id, job.instance_id, start, max(start, end)))
    return found


def _busy_by_instance(jobs: Iterable[JobInterval], intervals: Iterable[RunningInterval]) -> dict[str, float]:
    running: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for interval in intervals:
        running[interval.instance_id].append((interval.start, interval.end))
    spans: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for job in jobs:
        if job.instance_id and job.end > job.start:
            spans[job.instance_id].append((job.start, job.end))
    busy = {}
    for instance_id, job_spans in spans.items():
        # Both lists sorted and disjoint: one pass over the two (a month of jobs is tens of thousands).
        jobs_union, runs = _union(job_spans), _union(running.get(instance_id, []))
        total, j = timedelta(), 0
        for start, end in jobs_union:
            while j < len(runs) and runs[j][1] <= start:
                j += 1
            k = j
            while k < len(runs) and runs[k][0] < end:
                total += min(end, runs[k][1]) - max(start, runs[k][0])
                k += 1
        busy[instance_id] = total.total_seconds()
    return busy


def _union(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _as_time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else parse_time(value.split("#")[0])
