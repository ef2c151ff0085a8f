"""Workload traces for the cost simulator: when jobs arrive and how much GPU time each needs, per day.

Time is seconds since midnight of day 0; every day is a working day. Same name, days and seed: same trace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DAY_SECONDS = 86400.0
WORKDAY_START_SECONDS = 9 * 3600.0
WORKDAY_END_SECONDS = 17 * 3600.0


@dataclass(frozen=True)
class TraceJob:
    arrival_seconds: float
    duration_seconds: float


@dataclass(frozen=True)
class Trace:
    name: str
    days: int
    description: str
    jobs: tuple[TraceJob, ...]

    @property
    def busy_seconds(self) -> float:
        return sum(job.duration_seconds for job in self.jobs)


def seed_trace(days: int, rng: random.Random) -> Trace:
    """The original pattern's workload: 4 jobs of 20 minutes a day, spread over the working day.

    The working day 09:00-17:00 is cut into four 2-hour slots; one job arrives at a uniform time in each.
    Two jobs can overlap when one arrives late in its slot and the next early in its own.
    """
    slot_seconds = (WORKDAY_END_SECONDS - WORKDAY_START_SECONDS) / 4
    jobs = [
        TraceJob(
            day * DAY_SECONDS + WORKDAY_START_SECONDS + slot * slot_seconds + rng.uniform(0, slot_seconds),
            1200.0,
        )
        for day in range(days)
        for slot in range(4)
    ]
    return Trace(
        "seed", days, "4 jobs/day x 20 min, one at a uniform time in each 2 h slot of 09-17", _sorted(jobs)
    )


def bursty_trace(
    days: int,
    rng: random.Random,
    bursts_per_day: int = 20,
    uploads_per_burst: int = 30,
    duration_seconds_range: tuple[float, float] = (5.0, 20.0),
    burst_spread_seconds: float = 60.0,
) -> Trace:
    """Many short jobs arriving in bursts: a client uploading a folder of files.

    Burst starts are uniform over the working day; a burst's uploads arrive at uniform times within
    `burst_spread_seconds` of its start (30 files over a minute: one `aws s3 cp --recursive`);
    each job needs a uniform 5-20 s of GPU.
    """
    low, high = duration_seconds_range
    jobs = []
    for day in range(days):
        for _ in range(bursts_per_day):
            burst_start = day * DAY_SECONDS + rng.uniform(
                WORKDAY_START_SECONDS, WORKDAY_END_SECONDS - burst_spread_seconds
            )
            for _ in range(uploads_per_burst):
                jobs.append(
                    TraceJob(burst_start + rng.uniform(0, burst_spread_seconds), rng.uniform(low, high))
                )
    description = (
        f"{bursts_per_day} bursts/day (uniform in 09-17) x {uploads_per_burst} uploads within "
        f"{burst_spread_seconds:.0f} s, {low:.0f}-{high:.0f} s each"
    )
    return Trace("bursty", days, description, _sorted(jobs))


def poisson_trace(
    days: int,
    rng: random.Random,
    arrivals_per_hour: float = 12.0,
    mean_duration_seconds: float = 60.0,
) -> Trace:
    """Independent uploads around the clock: Poisson arrivals, exponential GPU durations.

    12 arrivals an hour (mean gap 5 min) of 60 s mean: 288 jobs and 4.8 GPU-hours a day, a third of
    them inside 09-17 (the always-on instance makes the rest wait for the morning).
    """
    jobs = []
    t = rng.expovariate(arrivals_per_hour / 3600.0)
    while t < days * DAY_SECONDS:
        jobs.append(TraceJob(t, rng.expovariate(1.0 / mean_duration_seconds)))
        t += rng.expovariate(arrivals_per_hour / 3600.0)
    description = (
        f"Poisson {arrivals_per_hour:g}/h around the clock, exponential {mean_duration_seconds:g} s mean"
    )
    return Trace("poisson", days, description, _sorted(jobs))


TRACES = {"seed": seed_trace, "bursty": bursty_trace, "poisson": poisson_trace}


def build_trace(name: str, days: int, seed: int) -> Trace:
    """The named trace; its generator is seeded from (name, seed), so traces do not share random draws."""
    return TRACES[name](days, random.Random(f"{name}:{seed}"))


def _sorted(jobs: list[TraceJob]) -> tuple[TraceJob, ...]:
    return tuple(sorted(jobs, key=lambda job: job.arrival_seconds))
