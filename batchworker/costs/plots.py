"""Pictures of the cost numbers: the simulator's comparison and a deployment's timeline (matplotlib, Agg)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from batchworker.costs.billing import CostReport, JobInterval


def plot_comparison(result: dict, path: Path) -> None:
    """Per trace, per policy: billed and busy GPU-hours a day (log scale) and the physical limit."""
    traces = result["traces"]
    days = result["parameters"]["days"]
    fig, axes = plt.subplots(1, len(traces), figsize=(5.2 * len(traces), 4.8), squeeze=False)
    for ax, (name, trace) in zip(axes[0], traces.items(), strict=True):
        policies = list(trace["policies"])
        billed = [trace["policies"][p]["billed_seconds"] / 3600 / days for p in policies]
        busy = [trace["policies"][p]["busy_seconds"] / 3600 / days for p in policies]
        positions = range(len(policies))
        ax.bar([x - 0.2 for x in positions], billed, width=0.4, label="billed", color="tab:red")
        ax.bar([x + 0.2 for x in positions], busy, width=0.4, label="busy", color="tab:green")
        ax.axhline(
            trace["limit_seconds"] / 3600 / days,
            color="black",
            linestyle="--",
            linewidth=1,
            label="physical limit",
        )
        for x, policy in zip(positions, policies, strict=True):
            ratio = trace["policies"][policy]["billed_over_busy"]
            ax.annotate(
                f"{ratio:.2f}x",
                (x - 0.2, billed[x]),
                ha="center",
                va="bottom",
                fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            )
        ax.set_yscale("log")
        ax.set_ylim(min(busy) / 3, max(billed) * 1.6)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(
            list(positions), [p.replace("batchworker-", "bw-") for p in policies], rotation=20, fontsize=8
        )
        ax.set_ylabel("GPU-hours per day")
        ax.set_title(f"{name}: {trace['jobs'] / days:.0f} jobs/day", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper right")
    parameters = result["parameters"]
    fig.suptitle(
        f"billed vs busy GPU time ({days} days, seed {parameters['seed']}, idle grace at most "
        f"{parameters['idle_grace_seconds']:g} s, pool {parameters['pool_size']}; label: billed/busy)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(report: CostReport, jobs: list[JobInterval], path: Path) -> None:
    """One lane per instance with its running intervals, and one under it with its jobs."""
    instance_ids = sorted(
        {interval.instance_id for interval in report.intervals} | {j.instance_id for j in jobs}
    )
    height = max(2.5, 0.9 * len(instance_ids) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    labels, ticks = [], []
    for lane, instance_id in enumerate(reversed(instance_ids)):
        base = lane * 3
        runs = [i for i in report.intervals if i.instance_id == instance_id]
        ax.broken_barh(
            _spans([(i.start, i.end) for i in runs]),
            (base + 1.5, 1),
            color="tab:red",
            label="running (billed)" if lane == 0 else None,
        )
        own = [j for j in jobs if j.instance_id == instance_id]
        ax.broken_barh(
            _spans([(j.start, j.end) for j in own]),
            (base + 0.3, 1),
            color="tab:green",
            alpha=0.6,
            label="job" if lane == 0 else None,
        )
        labels += [f"{instance_id} jobs", instance_id]
        ticks += [base + 0.8, base + 2.0]
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    fig.autofmt_xdate()
    ax.set_title(
        f"{report.instance_type}: billed {report.billed_seconds} s, busy {report.busy_seconds:.0f} s, "
        f"utilization {report.utilization:.0%}, ${report.cost_dollars:.2f}",
        fontsize=10,
    )
    if instance_ids:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("UTC")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spans(intervals: list[tuple[datetime, datetime]]) -> list[tuple[float, float]]:
    return [
        (mdates.date2num(start), max(mdates.date2num(end) - mdates.date2num(start), 1e-6))
        for start, end in intervals
    ]
