"""`make bench`: measure the pipeline on the local cloud and write bench-results.json.

Every measurement runs REPETITIONS times, round-robin with the other measurements of its cloud (A, B, A, B,
...: a slow minute on a shared machine hits every measurement, not one), and each number is published as
the median of its repetitions, with `<key>_min` and `<key>_max` beside it. Goals are judged on the median.

Cloud "one" (1 instance, idle grace 60 s):
- overhead: small jobs uploaded one after another (the idle grace keeps the instance warm); per job,
  upload -> manifest minus the job's own compute (decode + forward) minus the boot delay when it booted;
- worker vs bare: items/s through the job (download excluded, decode included) over items/s of the bare
  model forward on the same data in this process, the job then the bare loop in each repetition.
Cloud "four" (4 instances, no idle grace, one job per instance at a time):
- pool: a burst of "hold" jobs of fixed duration (the slot is held, the host CPU is not: each local
  instance stands for a machine with its own GPU) on 1 instance (the other three untagged, so the pool
  does not see them) then on all 4, each from a stopped pool; the same with CPU-burning "compute" jobs is
  reported too (bounded by this machine's cores);
- cold: single jobs on a stopped pool, for the stage breakdown up to "stopped" and cold_start_overhead_s.
The cost simulator's numbers are a seeded model, not a measurement: computed once.

Adding a key: write `@measure("one" | "four") def name(bench, args) -> dict` that measures ONE repetition
and returns numbers (for a ratio, measure both sides inside and return the ratio); nothing else to wire.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import boto3
import numpy as np
from rich.console import Console
from rich.table import Table

from batchworker.costs.simulator import simulate_all
from batchworker.local import cloud
from batchworker.local.state import LocalOptions, client_environment, read_state
from batchworker.models import POOL_TAG_KEY, job_id_for, parse_time

console = Console(stderr=True)
REPO_ROOT = Path(__file__).resolve().parents[1]
BOOT_DELAY_SECONDS = 2.0
REPETITIONS = 3
CLOUDS = {
    # The reaper every 6 s (not 60): the idle grace ends on time, so the next run starts from stopped.
    "one": LocalOptions(boot_delay_seconds=BOOT_DELAY_SECONDS, idle_grace_seconds=60, max_jobs_per_instance=1,
                        schedule_speedup=10),
    "four": LocalOptions(boot_delay_seconds=BOOT_DELAY_SECONDS, idle_grace_seconds=0, instance_count=4,
                         max_jobs_per_instance=1),
}
GOALS = {  # key: (comparison, goal), judged on the median
    "overhead_p50_s": ("<=", 1.0), "overhead_p95_s": ("<=", 2.0), "worker_vs_bare_ratio": (">=", 0.9),
    "pool4_efficiency": (">=", 0.85), "cold_start_overhead_s": ("<=", 0.5),
    "sim_seed_billed_over_limit": ("<=", 1.05), "sim_bursty_billed_over_busy": ("<=", 1.5),
    "byo_runner_vs_direct_ratio": (">=", 0.95), "env_cache_hit_start_s": ("<=", 1.0),
    "setup_calls_per_burst": ("<=", 1),
}

Measurement = Callable[["Bench", argparse.Namespace], dict]
MEASUREMENTS: dict[str, list[Measurement]] = {name: [] for name in CLOUDS}


def measure(cloud_name: str) -> Callable[[Measurement], Measurement]:
    """Register a measurement of one repetition on the named cloud."""
    def register(function: Measurement) -> Measurement:
        MEASUREMENTS[cloud_name].append(function)
        return function
    return register


class Bench:
    def __init__(self, local_dir: Path, options: LocalOptions):
        self.local_dir = local_dir
        self.options = options

    def __enter__(self):
        cloud.up(self.local_dir, self.options, progress=lambda p: console.print(f"  local cloud: {p}"))
        env = client_environment(read_state(self.local_dir))
        self.env = env
        session = boto3.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        self.s3 = session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.ddb = session.client("dynamodb", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.ec2 = session.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"])
        self.instance_ids = sorted(self.states())
        return self

    def __exit__(self, *exc):
        cloud.down(self.local_dir)

    def put(self, key: str, body: bytes) -> tuple[str, float]:
        uploaded_at = time.time()
        response = self.s3.put_object(Bucket=self.env["BATCHWORKER_INPUT_BUCKET"], Key=key, Body=body)
        return job_id_for(self.env["BATCHWORKER_INPUT_BUCKET"], key, response.get("VersionId") or response["ETag"]), uploaded_at

    def manifest(self, job_id: str, timeout: float = 300, poll_seconds: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            manifest = self.try_manifest(job_id)
            if manifest is not None:
                return manifest
            time.sleep(poll_seconds)
        raise TimeoutError(f"no manifest for {job_id}")

    def try_manifest(self, job_id: str) -> dict | None:
        try:
            body = self.s3.get_object(Bucket=self.env["BATCHWORKER_OUTPUT_BUCKET"], Key=f"jobs/{job_id}/manifest.json")
        except self.s3.exceptions.NoSuchKey:
            return None
        return json.loads(body["Body"].read())

    def states(self) -> dict[str, str]:
        return {i["InstanceId"]: i["State"]["Name"]
                for r in self.ec2.describe_instances()["Reservations"] for i in r["Instances"]}

    def job(self, job_id: str) -> dict:
        item = self.ddb.get_item(TableName=self.env["BATCHWORKER_JOBS_TABLE"], Key={"job_id": {"S": job_id}})["Item"]
        return {k: next(iter(v.values())) for k, v in item.items()}

    def wait_stopped(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.states().values()) == {"stopped"}:
                return
            time.sleep(0.1)
        raise TimeoutError(f"instances not stopped after {timeout} s")

    def use_instances(self, count: int) -> None:
        """Only the first `count` instances carry the pool tag: the control plane finds the pool by tag."""
        tagged, untagged = self.instance_ids[:count], self.instance_ids[count:]
        self.ec2.create_tags(Resources=tagged, Tags=[{"Key": POOL_TAG_KEY, "Value": self.env["BATCHWORKER_POOL_TAG"]}])
        if untagged:
            self.ec2.delete_tags(Resources=untagged, Tags=[{"Key": POOL_TAG_KEY}])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def digits_png() -> bytes:
    return (REPO_ROOT / "samples" / "digit-3.png").read_bytes()


def stage_summary(stages: dict[str, list[float]]) -> dict:
    return {k: {"p50_s": percentile(v, 50), "p95_s": percentile(v, 95)} for k, v in stages.items()}


@measure("one")
def overhead(bench: Bench, args) -> dict:
    """Sequential small jobs; the idle grace keeps the instance warm between them."""
    rows, stages = [], {k: [] for k in ("trigger", "job_start", "manifest")}
    rep = time.time_ns()  # a new key per repetition: a new object, a new job
    for n in range(args.jobs):
        booted = set(bench.states().values()) == {"stopped"}  # this job has to start the instance
        job_id, uploaded_at = bench.put(f"bench/overhead/{rep}-{n}.png", digits_png())
        manifest = bench.manifest(job_id)
        seen_at = time.time()
        t = manifest["timings"]
        finished = parse_time(t["finished_at"]).timestamp()
        compute = t.get("inference_s", 0.0)  # the handler's process() call
        rows.append(max(finished, seen_at) - uploaded_at - compute - (BOOT_DELAY_SECONDS if booted else 0.0))
        job = bench.job(job_id)
        stages["trigger"].append(parse_time(job["created_at"]).timestamp() - uploaded_at)
        stages["job_start"].append(parse_time(t["started_at"]).timestamp() - uploaded_at)
        stages["manifest"].append(seen_at - uploaded_at)
    return {"overhead_p50_s": percentile(rows, 50), "overhead_p95_s": percentile(rows, 95),
            "stages_warm": stage_summary(stages)}


@measure("one")
def worker_vs_bare(bench: Bench, args) -> dict:
    """The job's items/s (decode included, download excluded) over the bare forward's items/s, same data."""
    import torch
    from sklearn.datasets import load_digits

    from batchworker.local.paths import DEFAULT_JOB_PACKAGE, MODEL_PATH

    sys.path.insert(0, str(DEFAULT_JOB_PACKAGE))  # the default job's handler: its batch size is the job's
    from handler import BATCH_SIZE

    items = args.items
    data = np.resize(load_digits().data.astype(np.uint8), (items, 64))  # values 0-16: uint8 keeps the upload small
    buffer = io.BytesIO()
    np.save(buffer, data.reshape(items, 8, 8))
    job_id, _ = bench.put(f"bench/throughput-{time.time_ns()}.npy", buffer.getvalue())
    manifest = bench.manifest(job_id, poll_seconds=1.0)  # slow polls: moto answering them shares the cores
    rows = manifest.get("results_rows") or manifest["items"]  # the digits package: one .npy item, N rows
    job_items_per_s = rows / manifest["timings"]["inference_s"]
    model = torch.jit.load(str(MODEL_PATH)).eval()
    tensor = torch.from_numpy(data.reshape(items, 1, 8, 8).astype(np.float32) / 16.0)
    with torch.inference_mode():
        for chunk in torch.split(tensor[:BATCH_SIZE * 2], BATCH_SIZE):  # warm-up, as the job's model is warm
            torch.softmax(model(chunk), dim=1)
        started = time.perf_counter()
        for chunk in torch.split(tensor, BATCH_SIZE):  # the job's batch size: the ratio is the job's overhead
            torch.softmax(model(chunk), dim=1)
        bare_items_per_s = items / (time.perf_counter() - started)
    return {"worker_vs_bare_ratio": job_items_per_s / bare_items_per_s,
            "worker_items_per_s": job_items_per_s, "bare_items_per_s": bare_items_per_s}


def pool_run(bench: Bench, workload: str, instances: int, jobs: int, seconds: float) -> tuple[float, dict]:
    """Jobs per second for a burst of compute-only jobs on `instances` instances, from a stopped pool (first
    upload -> last manifest), and where the time went on the instance that finished last."""
    bench.wait_stopped()
    bench.use_instances(instances)
    body = json.dumps({"workload": workload, "seconds": seconds}).encode()
    started = time.time()
    ids = [bench.put(f"bench/pool-{workload}-{instances}/{started}-{n}.json", body)[0] for n in range(jobs)]
    manifests = []
    for job_id in ids:
        manifests.append(bench.manifest(job_id, timeout=900, poll_seconds=0.2))
        if manifests[-1]["status"] != "succeeded":
            raise RuntimeError(f"pool job {job_id} failed: {manifests[-1].get('error')}")
    ended = time.time()
    bench.wait_stopped()
    bench.use_instances(len(bench.instance_ids))
    return jobs / (ended - started), critical_path(manifests, started, ended)


def critical_path(manifests: list[dict], started: float, ended: float) -> dict:
    """The run's time on the instance that finished last: its start (boot, process, first dispatch), the jobs'
    own work (compute plus download/upload/manifest), the gaps between one job's end and the next one's start
    (dispatch round trips, hand-offs), and the tail until the client saw the last manifest."""
    by_instance: dict[str, list[tuple[float, float, dict]]] = {}
    for manifest in manifests:
        t = manifest["timings"]
        busy_from = parse_time(t["started_at"]).timestamp() + t.get("slot_wait_s", 0.0)
        by_instance.setdefault(manifest["instance_id"], []).append(
            (busy_from, parse_time(t["finished_at"]).timestamp(), t))
    runs = sorted(max(by_instance.values(), key=lambda jobs: max(end for _, end, _ in jobs)), key=lambda r: r[0])
    # The workload itself: inside inference_s (the handler's process() call)
    compute = sum(t.get("inference_s", 0.0) for _, _, t in runs)
    phases = {f"jobs_{phase}": sum(t.get(phase, 0.0) for _, _, t in runs)
              for phase in ("package_s", "environment_s", "download_s", "model_load_s", "upload_s")}
    return {
        "start_s": runs[0][0] - started,
        "compute_s": compute,
        "job_io_s": sum(end - begin for begin, end, _ in runs) - compute,
        # of which the first job's: imports and setup of a cold process land there (none when prewarmed)
        "first_job_io_s": runs[0][1] - runs[0][0] - runs[0][2].get("inference_s", 0.0),
        **phases,
        "gaps_s": sum(max(0.0, nxt[0] - prev[1]) for prev, nxt in pairwise(runs)),
        "tail_s": ended - runs[-1][1],
        "jobs_on_it": float(len(runs)),
        "most_jobs_on_an_instance": float(max(len(jobs) for jobs in by_instance.values())),
    }


@measure("four")
def pool_hold(bench: Bench, args) -> dict:
    one, one_path = pool_run(bench, "hold", 1, args.pool_jobs, args.pool_seconds)
    four, four_path = pool_run(bench, "hold", 4, args.pool_jobs, args.pool_seconds)
    return {"pool4_efficiency": four / (4 * one), "pool1_jobs_per_s": one, "pool4_jobs_per_s": four,
            "pool1_critical_path": one_path, "pool4_critical_path": four_path}


@measure("four")
def pool_cpu(bench: Bench, args) -> dict:
    one, _ = pool_run(bench, "compute", 1, args.cpu_pool_jobs, args.cpu_pool_seconds)
    four, _ = pool_run(bench, "compute", 4, args.cpu_pool_jobs, args.cpu_pool_seconds)
    return {"pool4_efficiency_cpu_bound": four / (4 * one)}


@measure("four")
def cold_cycles(bench: Bench, args) -> dict:
    """One job at a time on a stopped pool with no idle grace: every stage, up to the instance stopped.

    One loop polls the instance states and the manifest every 50 ms, so each time is seen within ~0.1 s.
    """
    stages = {k: [] for k in ("trigger", "instance_running", "job_start", "manifest", "stopped")}
    delays: list[float] = []
    for n in range(args.cold_cycles):
        bench.wait_stopped(120)
        job_id, uploaded_at = bench.put(f"bench/cold/{time.time_ns()}-{n}.png", digits_png())
        running_at: dict[str, float] = {}
        manifest, seen_at, stopped_at = None, 0.0, None
        deadline = time.monotonic() + 180
        while stopped_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cold cycle {n}: no manifest or no stop within 180 s")
            now, states = time.time(), bench.states()
            for instance_id, state in states.items():
                if state == "running":
                    running_at.setdefault(instance_id, now)
            if manifest is None:
                manifest = bench.try_manifest(job_id)
                seen_at = now
            if manifest is not None and states[manifest["instance_id"]] == "stopped":
                stopped_at = now
            time.sleep(0.05)
        stages["trigger"].append(parse_time(bench.job(job_id)["created_at"]).timestamp() - uploaded_at)
        stages["instance_running"].append(running_at[manifest["instance_id"]] - uploaded_at)
        t = manifest["timings"]
        # When the job's work began: after any wait in a warm server's queue (a prewarming server included)
        stages["job_start"].append(parse_time(t["started_at"]).timestamp() + t.get("slot_wait_s", 0.0) - uploaded_at)
        stages["manifest"].append(seen_at - uploaded_at)
        stages["stopped"].append(stopped_at - uploaded_at)
        # Everything the cold path added beyond the boot delay before the job's own work was done: trigger,
        # start, SSH, launch, process start, imports, model load or setup(), download; not the work itself
        # (compute, or the handler's call) nor the job's own uploads. Independent of where started_at is taken.
        own = t.get("inference_s", 0.0) + t.get("upload_s", 0.0)
        delays.append(parse_time(t["finished_at"]).timestamp() - uploaded_at - own - BOOT_DELAY_SECONDS)
    return {"cold_start_overhead_s": percentile(delays, 50),
            "stages_cold": stage_summary(stages)}


def summarize(repetitions: list[dict]) -> dict:
    """Median of every number over the repetitions; top-level numbers also get `_min` and `_max`."""
    summary: dict = {}
    for key in repetitions[0]:
        values = [rep[key] for rep in repetitions if key in rep]
        if isinstance(values[0], dict):
            summary[key] = {k: v for k, v in summarize(values).items() if not k.endswith(("_min", "_max"))}
        else:
            summary[key] = statistics.median(values)
            summary[f"{key}_min"], summary[f"{key}_max"] = min(values), max(values)
    return summary


def run_cloud(name: str, base: Path, args, results: dict) -> None:
    console.rule(f"cloud {name!r}: {', '.join(f.__name__ for f in MEASUREMENTS[name])}")
    per_measurement: dict[str, list[dict]] = {f.__name__: [] for f in MEASUREMENTS[name]}
    with Bench(base / f"bench-{name}", CLOUDS[name]) as bench:
        for rep in range(args.repetitions):
            for function in MEASUREMENTS[name]:
                started = time.monotonic()
                values = function(bench, args)
                per_measurement[function.__name__].append(values)
                shown = {k: round(v, 3) for k, v in values.items() if isinstance(v, float)}
                console.print(f"  [{rep + 1}/{args.repetitions}] {function.__name__} "
                              f"({time.monotonic() - started:.0f} s): {shown}")
    for reps in per_measurement.values():
        results.update(summarize(reps))


def verdicts(results: dict) -> dict[str, str]:
    judged = {}
    for key, (comparison, goal) in GOALS.items():
        if key in results:
            value = results[key]
            met = value <= goal if comparison == "<=" else value >= goal
            judged[key] = f"{'met' if met else 'MISSED'} ({comparison} {goal})"
    return judged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=REPETITIONS, help=f"default {REPETITIONS}")
    parser.add_argument("--jobs", type=int, default=17, help="sequential jobs per overhead repetition (default 17)")
    parser.add_argument("--items", type=int, default=100_000, help="items in the worker-vs-bare .npy (default 100,000)")
    parser.add_argument("--pool-jobs", type=int, default=32, help="hold jobs per pool run (default 32)")
    parser.add_argument("--pool-seconds", type=float, default=6.0, help="duration of each hold job (default 6)")
    parser.add_argument("--cpu-pool-jobs", type=int, default=4, help="CPU-burning jobs per pool run (default 4)")
    parser.add_argument("--cpu-pool-seconds", type=float, default=4.0, help="duration of each CPU job (default 4)")
    parser.add_argument("--cold-cycles", type=int, default=3, help="cold jobs per repetition (default 3)")
    parser.add_argument("--byo-items", type=int, default=2000, help="images in the runner-vs-direct zip (default 2000)")
    parser.add_argument("--burst", type=int, default=50, help="uploads in the setup-calls burst (default 50)")
    parser.add_argument("--clouds", nargs="+", choices=list(CLOUDS), default=list(CLOUDS))
    parser.add_argument("--only", nargs="+", metavar="MEASUREMENT", help="run only these measurements (by name)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results.json")
    args = parser.parse_args()
    base = Path(os.environ.get("BATCHWORKER_LOCAL_DIR") or REPO_ROOT / ".local-cloud")
    results: dict = {"repetitions": args.repetitions, "load_average_at_start": os.getloadavg()[0]}
    started = time.monotonic()

    sim = simulate_all(days=30, seed=0)["headline"]  # a seeded model: one run, the same numbers every time
    for key in ("sim_seed_billed_over_limit", "sim_bursty_billed_over_busy", "sim_bursty_original_billed_over_busy"):
        results[key] = results[f"{key}_min"] = results[f"{key}_max"] = sim[key]

    if args.only:
        for name in CLOUDS:
            MEASUREMENTS[name] = [f for f in MEASUREMENTS[name] if f.__name__ in args.only]
    for name in [name for name in args.clouds if MEASUREMENTS[name]]:
        run_cloud(name, base, args, results)
        results["wall_time_s"] = time.monotonic() - started
        results["load_average_at_end"] = os.getloadavg()[0]
        results["verdicts"] = verdicts(results)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial, should a later cloud fail

    table = Table(title=f"bench ({args.out.name}): median [min - max] of {args.repetitions}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("goal")
    for name, value in results.items():
        if name.endswith(("_min", "_max")) or name == "verdicts":
            continue
        if isinstance(value, dict) and name.startswith("stages_"):
            for stage, numbers in value.items():
                table.add_row(f"{name} upload->{stage} p50/p95 s", f"{numbers['p50_s']:.2f} / {numbers['p95_s']:.2f}")
        elif isinstance(value, dict):
            table.add_row(name, ", ".join(f"{k} {v:.2f}" for k, v in value.items()))
        elif f"{name}_min" in results:
            table.add_row(name, f"{value:.3f} [{results[name + '_min']:.3f} - {results[name + '_max']:.3f}]",
                          results["verdicts"].get(name, ""))
        else:
            table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console(width=max(Console().width, 120)).print(table)
    return 0


# --- dashboard (issue 12) ---------------------------------------------------------------------------------
DASHBOARD_JOBS = 10_000
DASHBOARD_TABLE = "bench-dashboard-jobs"
GOALS["dashboard_jobs_page_s"] = ("<=", 1.0)


@measure("one")
def dashboard_jobs_page(bench: Bench, args) -> dict[str, float]:
    """Server seconds of the first render of the jobs page over a job table of 10,000 jobs.

    The table (shaped as terraform/dynamodb.tf, filled on the first repetition) lives in the local cloud's
    moto server beside the deployment's own; each repetition builds a fresh app (templates not compiled yet)
    and times its first GET /jobs, DynamoDB queries over HTTP included (moto reads the whole table for each
    query of the status index, one per status; DynamoDB reads only the page).
    """
    from datetime import timedelta

    from batchworker.cli.client import Deployment
    from batchworker.dashboard.app import create_app
    from batchworker.jobs import INDEX_ATTRIBUTES, SHARD_ATTRIBUTE, STATUS_INDEX, status_shard
    from batchworker.models import isoformat, utc_now

    if DASHBOARD_TABLE not in bench.ddb.list_tables()["TableNames"]:
        bench.ddb.create_table(
            TableName=DASHBOARD_TABLE, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("job_id", SHARD_ATTRIBUTE, "created_at")],
            KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[{"IndexName": STATUS_INDEX,
                                     "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": list(INDEX_ATTRIBUTES)},
                                     "KeySchema": [{"AttributeName": SHARD_ATTRIBUTE, "KeyType": "HASH"},
                                                   {"AttributeName": "created_at", "KeyType": "RANGE"}]}],
        )
        first = utc_now() - timedelta(days=3)
        statuses = ["SUCCEEDED"] * 8 + ["FAILED", "RUNNING"]
        for start in range(0, DASHBOARD_JOBS, 25):
            bench.ddb.batch_write_item(RequestItems={DASHBOARD_TABLE: [{"PutRequest": {"Item": {
                "job_id": {"S": f"j-{n:016x}"}, "status": {"S": statuses[n % len(statuses)]},
                SHARD_ATTRIBUTE: {"S": status_shard(f"j-{n:016x}", statuses[n % len(statuses)])},
                "input_bucket": {"S": "bench-input"}, "input_key": {"S": f"uploads/{n:05d}.png"},
                "created_at": {"S": isoformat(first + timedelta(seconds=20 * n))},
                "updated_at": {"S": isoformat(first + timedelta(seconds=20 * n + 15))}, "attempts": {"N": "1"},
            }}} for n in range(start, min(start + 25, DASHBOARD_JOBS))]})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the local cloud's fake credentials
        os.environ.setdefault(name, bench.env[name])
    deployment = Deployment(bench.env["BATCHWORKER_INPUT_BUCKET"], bench.env["BATCHWORKER_OUTPUT_BUCKET"],
                            DASHBOARD_TABLE, bench.env["BATCHWORKER_INSTANCE_EVENTS_TABLE"],
                            bench.env["BATCHWORKER_POOL_TAG"], endpoint_url=bench.env["AWS_ENDPOINT_URL"],
                            region=bench.env["AWS_DEFAULT_REGION"])
    client = create_app(deployment).test_client()
    started = time.perf_counter()
    response = client.get("/jobs")
    seconds = time.perf_counter() - started
    assert response.status_code == 200 and response.get_data(as_text=True).count('<tr class="status-') == 50
    return {"dashboard_jobs_page_s": seconds}


# --- job packages (issue 10) ------------------------------------------------------------------------------

EXAMPLE_JOBS = REPO_ROOT / "examples" / "jobs"


@measure("one")
def byo_runner_vs_direct(bench: Bench, args) -> dict:
    """Items/s of the digits package through the instance's runner (the manifest's inference_s: process()
    driven to its last row in the warm handler process, as the runner collects the rows) over the same
    handler's process() called directly in this process, same zip of images. Writing results.csv is the
    manifest's results_s, reported as byo_results_s."""
    import contextlib
    import logging
    import tempfile
    import zipfile

    from worker.handler_context import Item, JobContext
    from worker.items import expand_items

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(args.byo_items):
            archive.writestr(f"img/{n:05d}.png", digits_png())
    job_id, _ = bench.put(f"digits/bench-byo-{time.time_ns()}.zip", buffer.getvalue())  # the bundled package
    manifest = bench.manifest(job_id, poll_seconds=1.0)
    assert manifest["status"] == "succeeded", manifest["error"]
    runner_items_per_s = manifest["items"] / manifest["timings"]["inference_s"]
    package = EXAMPLE_JOBS / "digits"
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(package):
        path = Path(scratch) / "in.zip"
        path.write_bytes(buffer.getvalue())
        items = [Item(i.name, i.path) for i in expand_items(path, "in.zip", Path(scratch) / "items")]
        sys.path.insert(0, str(package))
        try:
            from handler import Digits
        finally:
            sys.path.remove(str(package))
        log = logging.getLogger("bench.direct")
        handler = Digits()
        handler.setup(JobContext(package, log, job_id="direct", params={}, output_dir=Path(scratch) / "out0"))
        ctx = JobContext(package, log, job_id="direct", params={}, output_dir=Path(scratch) / "out")
        started = time.perf_counter()
        rows = list(handler.process(items, ctx))
        direct_items_per_s = len(items) / (time.perf_counter() - started)
    assert len(rows) == manifest["items"] == args.byo_items
    timings = manifest["timings"]
    return {"byo_runner_vs_direct_ratio": runner_items_per_s / direct_items_per_s,
            "byo_runner_items_per_s": runner_items_per_s, "byo_direct_items_per_s": direct_items_per_s,
            # reported beside it: writing results.csv/errors.jsonl (not in process()), the job's whole time
            "byo_results_s": timings.get("results_s", 0.0), "byo_job_total_s": timings["total_s"]}


@measure("one")
def env_cache(bench: Bench, args) -> dict:
    """A fresh copy of the tabular package (requirements made unique, so its environment is new) is deployed;
    its first job builds the environment (env_first_build_s), the next one on the warm instance finds it:
    upload -> process() called is env_cache_hit_start_s."""
    import shutil
    import tempfile

    from batchworker.jobpkg.registry import PackageRegistry

    rep = time.time_ns()
    registry = PackageRegistry(bench.env["BATCHWORKER_ARTIFACTS_BUCKET"], bench.s3)
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "tabular"
        shutil.copytree(EXAMPLE_JOBS / "tabular", package, ignore=shutil.ignore_patterns("__pycache__"))
        requirements = package / "requirements.txt"
        requirements.write_text(requirements.read_text() + f"pandas!=0.0.{rep % 100000}\n")  # same install, new key
        registry.deploy(package)
    sample = (EXAMPLE_JOBS / "tabular" / "sample" / "flowers.csv").read_bytes()
    first_id, _ = bench.put(f"tabular/bench-{rep}-first.csv", sample)
    first = bench.manifest(first_id, timeout=600)
    assert first["status"] == "succeeded" and not first["environment"]["cache_hit"], first
    second_id, uploaded_at = bench.put(f"tabular/bench-{rep}-second.csv", sample)
    second = bench.manifest(second_id)
    assert second["status"] == "succeeded" and second["environment"]["cache_hit"], second
    started = parse_time(second["handler"]["process_started_at"]).timestamp()
    return {"env_first_build_s": first["environment"]["build_s"], "env_cache_hit_start_s": started - uploaded_at}


@measure("one")
def setup_calls(bench: Bench, args) -> dict:
    """A burst of uploads of one package (digits, as Terraform bundles it) to one instance: how many handler
    processes served it; each ran setup() once."""
    rep = time.time_ns()
    jobs = [bench.put(f"digits/burst-{rep}-{n}.png", digits_png())[0] for n in range(args.burst)]
    manifests = [bench.manifest(job_id) for job_id in jobs]
    assert all(m["status"] == "succeeded" for m in manifests)
    processes = {m["handler"]["pid"] for m in manifests}
    return {"setup_calls_per_burst": len(processes),
            "setups_started_in_burst": sum(bool(m["handler"]["setup_called"]) for m in manifests)}


if __name__ == "__main__":
    sys.exit(main())
