"""The policies the cost simulator compares: what starts an instance, what stops it, where a job runs."""

from __future__ import annotations

from dataclasses import dataclass

from batchworker.costs.traces import WORKDAY_END_SECONDS, WORKDAY_START_SECONDS


@dataclass(frozen=True)
class Policy:
    """One policy, as the simulator runs it.

    - `pool_size`: instances in the pool.
    - `concurrency_per_instance`: jobs an instance runs at once (None: no limit); concurrent jobs share
      its GPU evenly, so a second job never makes the first one faster.
    - `idle_grace_seconds`: an instance with nothing running and nothing queued stays up this long for
      work arriving right after; with `adaptive_grace` this is the upper bound of a learned grace.
    - `stop_on_any_output`: a finishing job stops its instance, cutting off the jobs still running on it.
    - `on_hours`: (start, end) seconds of day of a fixed schedule; None: started on demand.
    """

    name: str
    description: str
    pool_size: int = 1
    concurrency_per_instance: int | None = 1
    idle_grace_seconds: float = 0.0
    adaptive_grace: bool = False
    stop_on_any_output: bool = False
    on_hours: tuple[float, float] | None = None


def always_on_9_17(concurrency_per_instance: int = 1) -> Policy:
    return Policy(
        "always-on-9-17",
        "one instance on 09:00-17:00 every day; work left at 17:00 that arrived before it is finished first "
        "(billed), work arriving outside waits for 09:00",
        concurrency_per_instance=concurrency_per_instance,
        on_hours=(WORKDAY_START_SECONDS, WORKDAY_END_SECONDS),
    )


def original(concurrency_per_instance: int | None = 4) -> Policy:
    """Every upload's job runs at once on the one instance, up to what its GPU holds.

    The pattern ran one command per upload and had no queue; 4 jobs at a time on a 16 GB GPU is an
    assumption (a CUDA context and a model each), generous to it: with no limit the bursty trace never
    drains, since every output cuts off all the others and they start over together.
    """
    return Policy(
        "original",
        f"start the instance per upload if stopped, run jobs at once (up to {concurrency_per_instance}), "
        "stop on ANY job output: jobs still running are cut off, re-queued from scratch and restart it",
        concurrency_per_instance=concurrency_per_instance,
        stop_on_any_output=True,
    )


def batchworker(
    idle_grace_seconds: float = 120.0, pool_size: int = 1, concurrency_per_instance: int = 1
) -> Policy:
    """As shipped (idle_grace_policy "adaptive"): the grace is learned from recent gaps, at most the cap."""
    return Policy(
        "batchworker",
        f"this system: a burst shares one start, jobs queue on {pool_size} instance(s) "
        f"x {concurrency_per_instance} slot(s), idle grace learned from recent gaps (at most "
        f"{idle_grace_seconds:g} s)",
        pool_size=pool_size,
        concurrency_per_instance=concurrency_per_instance,
        idle_grace_seconds=idle_grace_seconds,
        adaptive_grace=True,
    )


def batchworker_fixed_grace(
    idle_grace_seconds: float = 120.0, pool_size: int = 1, concurrency_per_instance: int = 1
) -> Policy:
    """idle_grace_policy "fixed": every idle instance waits the whole grace."""
    return Policy(
        "batchworker-fixed",
        f"this system with idle_grace_policy = \"fixed\": every idle instance waits {idle_grace_seconds:g} s",
        pool_size=pool_size,
        concurrency_per_instance=concurrency_per_instance,
        idle_grace_seconds=idle_grace_seconds,
    )
