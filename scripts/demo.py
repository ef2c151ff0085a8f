"""`make demo`: bring the local cloud up, submit the bundled samples, show predictions and hop latencies, bring it down.

`make demo KEEP=1` (`--keep`) leaves the local cloud running afterwards, e.g. for `batchworker dashboard`.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchworker.cli.client import resolve
from batchworker.cli.views import stores
from batchworker.local import cloud, processes
from batchworker.local.paths import REPO_ROOT, local_dir
from batchworker.local.state import read_state
from batchworker.models import parse_time

SAMPLES = REPO_ROOT / "samples"
RESULTS = REPO_ROOT / "demo-results"
console = Console()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the local cloud running at the end")
    args = parser.parse_args()
    started = time.monotonic()
    console.rule("batchworker demo: local cloud")
    cloud.up(local_dir(), progress=lambda phase: console.print(f"  local cloud: {phase}"))
    ok = False
    try:
        ok = run_demo()
    finally:
        if args.keep and ok:
            console.print("local cloud left running: `.venv/bin/batchworker dashboard --open` to look, "
                          "`.venv/bin/batchworker local down` to stop it")
        else:
            state = read_state(local_dir()) or {}
            cloud.down(local_dir())
            left = processes.processes_marked(state.get("cloud_id", "-"))
            console.print(f"local cloud stopped; processes left behind: {len(left)}")
    console.print(f"[bold]demo wall time: {time.monotonic() - started:.1f}s[/bold]")
    return 0 if ok else 1


def run_demo() -> bool:
    inputs = sorted(p for p in SAMPLES.iterdir() if p.suffix in {".png", ".jpg", ".jpeg", ".csv", ".zip", ".npy"})
    console.rule(f"submitting {len(inputs)} sample inputs")
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "batchworker"), "submit", *map(str, inputs), "--wait", "--out", str(RESULTS),
         "--timeout", "600"],
        text=True, capture_output=True,
    )
    console.print(submit.stdout.rstrip())
    if submit.returncode != 0:
        console.print(f"[red]submit failed ({submit.returncode})[/red]\n{submit.stderr[-3000:]}")
    deployment = resolve({})
    jobs, pool = stores(deployment)
    all_jobs = {job.input_key: job for job in jobs.all()}
    show_predictions(inputs, all_jobs)
    wait_for_stop(pool)
    show_hops(deployment, inputs, all_jobs, pool)
    states = [i.state.value for i in pool.list()]
    console.print(f"instances at the end: {states}")
    return submit.returncode == 0 and states and all(s == "stopped" for s in states)


def show_predictions(inputs, all_jobs) -> None:
    labels = json.loads((SAMPLES / "labels.json").read_text()) if (SAMPLES / "labels.json").exists() else {}
    table = Table(title="predictions")
    for column in ("input", "item", "label", "confidence", "truth"):
        table.add_column(column)
    correct = total = 0
    for path in inputs:
        job = all_jobs.get(path.name)
        results = RESULTS / job.job_id / "results.csv" if job else None  # the default job's (digits package)
        if not results or not results.exists():
            table.add_row(path.name, "-", "[red]no result[/red]", "", "")
            continue
        truth = labels.get(path.name, [])
        with open(results, newline="") as f:
            for n, row in enumerate(csv.DictReader(f)):
                expected = str(truth[n]) if n < len(truth) else ""
                total += bool(expected)
                correct += expected == row["label"]
                item = f"{row['item']} row {row['row']}" if row.get("row") else row["item"]  # .csv/.npy rows
                table.add_row(path.name, item, row["label"], f"{float(row['confidence']):.3f}", expected)
    console.print(table)
    if total:
        console.print(f"correct: {correct}/{total}")


def wait_for_stop(pool, timeout_seconds: float = 120) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and any(i.state.value != "stopped" for i in pool.list()):
        time.sleep(0.5)


def show_hops(deployment, inputs, all_jobs, pool) -> None:
    """Per job: upload -> trigger -> instance running -> job start -> manifest -> stopped."""
    s3 = deployment.client("s3")
    history = sorted(
        (event for instance in pool.list() for event in pool.history.events(instance.instance_id)),
        key=lambda e: e["at"],
    )
    table = Table(title="instance state history")
    for column in ("at", "instance", "change", "reason"):
        table.add_column(column)
    for event in history:
        table.add_row(event["at"], event["instance_id"], event["state"], event["reason"])
    for instance in pool.list():
        table.add_row("now", instance.instance_id, instance.state.value, "")
    console.print(table)
    starts = [parse_time(e["at"]) for e in history if e["state"] == "start"]
    stops = [parse_time(e["at"]) for e in history if e["state"] == "stop"]
    hops = Table(title="hop latencies (seconds from upload)")
    for column in ("input", "trigger", "instance start", "job start", "manifest", "stopped"):
        hops.add_column(column)
    for path in inputs:
        job = all_jobs.get(path.name)
        if not job:
            continue
        uploaded = s3.head_object(Bucket=deployment.input_bucket, Key=job.input_key)["LastModified"]
        manifest = json.loads((RESULTS / job.job_id / "manifest.json").read_text())
        created = parse_time(job.created_at)
        started = parse_time(manifest["timings"]["started_at"]) if manifest["timings"].get("started_at") else None
        finished = parse_time(manifest["timings"]["finished_at"])
        start = max((t for t in starts if t <= (started or finished)), default=None)
        stop = min((t for t in stops if t >= finished), default=None)

        hops.add_row(path.name, *(f"{(moment - uploaded).total_seconds():.2f}" if moment else "-"
                                  for moment in (created, start, started, finished, stop)))
    console.print(hops)
    console.print("(S3 LastModified has one-second resolution; the instance start row is the start request.)")


if __name__ == "__main__":
    sys.exit(main())
