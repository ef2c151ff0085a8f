"""`make bench`: measure the pipeline on the local cloud and write bench-results.json.

Workloads, each measured in this run on this machine:
- overhead: 50 small jobs uploaded one after another (the idle grace keeps the instance warm); per job,
  upload -> manifest minus the job's own compute (decode + forward) minus the boot delay when it booted;
- worker vs bare: items/s through the job (download excluded, decode included) over items/s of the bare
  model forward on the same data in this process, best of three runs each;
- pool: a burst of "hold" jobs of fixed duration (the slot is held, the host CPU is not: each local
  instance stands for a machine with its own GPU) on 1 instance and on 4, one job per instance at a time;
  the same with CPU-burning "compute" jobs is reported too (bounded by this machine's cores);
- cold cycles: single jobs on a stopped pool with no idle grace, for the stage breakdown up to "stopped";
- simulator: the cost simulator's headline numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import boto3
import numpy as np
from rich.console import Console
from rich.table import Table

from batchworker.costs.simulator import simulate_all
from batchworker.local import cloud
from batchworker.local.paths import MODEL_PATH, REPO_ROOT
from batchworker.local.state import LocalOptions, client_environment, read_state
from batchworker.models import job_id_for, parse_time

console = Console(stderr=True)
BOOT_DELAY_SECONDS = 2.0


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

    def history(self) -> list[dict]:
        items = []
        for r in self.ec2.describe_instances()["Reservations"]:
            for i in r["Instances"]:
                items += self.ddb.query(
                    TableName=self.env["BATCHWORKER_INSTANCE_EVENTS_TABLE"], KeyConditionExpression="instance_id = :i",
                    ExpressionAttributeValues={":i": {"S": i["InstanceId"]}})["Items"]
        return [{k: next(iter(v.values())) for k, v in item.items()} for item in items if "state" in item]

    def wait_stopped(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.states().values()) == {"stopped"}:
                return
            time.sleep(0.1)
        raise TimeoutError(f"instances not stopped after {timeout} s")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def digits_png() -> bytes:
    return (REPO_ROOT / "samples" / "digit-3.png").read_bytes()


def overhead(bench: Bench, count: int) -> dict:
    """Sequential small jobs; the idle grace keeps the instance warm between them."""
    rows, stages = [], {k: [] for k in ("trigger", "job_start", "manifest")}
    for n in range(count):
        booted = set(bench.states().values()) == {"stopped"}  # this job has to start the instance
        job_id, uploaded_at = bench.put(f"bench/overhead/{n}.png", digits_png())
        manifest = bench.manifest(job_id)
        seen_at = time.time()
        t = manifest["timings"]
        finished = parse_time(t["finished_at"]).timestamp()
        compute = t.get("inference_s", 0.0) + t.get("compute_s", 0.0)
        rows.append(max(finished, seen_at) - uploaded_at - compute - (BOOT_DELAY_SECONDS if booted else 0.0))
        job = bench.job(job_id)
        stages["trigger"].append(parse_time(job["created_at"]).timestamp() - uploaded_at)
        stages["job_start"].append(parse_time(t["started_at"]).timestamp() - uploaded_at)
        stages["manifest"].append(seen_at - uploaded_at)
    return {
        "overhead_p50_s": percentile(rows, 50), "overhead_p95_s": percentile(rows, 95), "overhead_jobs": count,
        "stages_warm": {k: {"p50_s": percentile(v, 50), "p95_s": percentile(v, 95)} for k, v in stages.items()},
    }


def cold_cycles(bench: Bench, count: int) -> dict:
    """One job at a time on a stopped pool with no idle grace: every stage, up to the instance stopped.

    One loop polls the instance states and the manifest every 50 ms, so each time is seen within ~0.1 s.
    """
    stages = {k: [] for k in ("trigger", "instance_running", "job_start", "manifest", "stopped")}
    for n in range(count):
        bench.wait_stopped(120)
        job_id, uploaded_at = bench.put(f"bench/cold/{n}.png", digits_png())
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
        stages["job_start"].append(parse_time(manifest["timings"]["started_at"]).timestamp() - uploaded_at)
        stages["manifest"].append(seen_at - uploaded_at)
        stages["stopped"].append(stopped_at - uploaded_at)
    return {"stages_cold": {k: {"p50_s": percentile(v, 50), "p95_s": percentile(v, 95)} for k, v in stages.items()},
            "cold_cycles": count}


def worker_vs_bare(bench: Bench, items: int) -> dict:
    """The job's items/s (decode included, download excluded) over the bare forward's items/s, same data."""
    import torch
    from sklearn.datasets import load_digits

    from worker.model import BATCH_SIZE

    data = np.resize(load_digits().data.astype(np.uint8), (items, 64))  # values 0-16: uint8 keeps the upload small
    buffer = io.BytesIO()
    np.save(buffer, data.reshape(items, 8, 8))
    job_items_per_s = 0.0
    for attempt in range(3):  # best of three, as for the bare forward below
        job_id, _ = bench.put(f"bench/throughput-{attempt}.npy", buffer.getvalue())
        manifest = bench.manifest(job_id, poll_seconds=1.0)  # slow polls: moto answering them shares the cores
        job_items_per_s = max(job_items_per_s, manifest["items"] / manifest["timings"]["inference_s"])
    model = torch.jit.load(str(MODEL_PATH)).eval()
    tensor = torch.from_numpy(data.reshape(items, 1, 8, 8).astype(np.float32) / 16.0)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            started = time.perf_counter()
            for chunk in torch.split(tensor, BATCH_SIZE):  # the job's batch size: the ratio is the job's overhead
                torch.softmax(model(chunk), dim=1)
            best = min(best, time.perf_counter() - started)
    bare_items_per_s = items / best
    return {"worker_vs_bare_ratio": job_items_per_s / bare_items_per_s,
            "worker_items_per_s": job_items_per_s, "bare_items_per_s": bare_items_per_s}


def pool_throughput(bench: Bench, workload: str, jobs: int, seconds: float) -> float:
    """Jobs per second for a burst of compute-only jobs of fixed duration (first upload -> last manifest)."""
    body = json.dumps({"workload": workload, "seconds": seconds}).encode()
    started = time.time()
    ids = [bench.put(f"bench/pool-{workload}/{n}.json", body)[0] for n in range(jobs)]
    for job_id in ids:
        manifest = bench.manifest(job_id, timeout=900)
        if manifest["status"] != "succeeded":
            raise RuntimeError(f"pool job {job_id} failed: {manifest.get('error')}")
    return jobs / (time.time() - started)


def pools(bench: Bench, args) -> dict[str, float]:
    """Both pool workloads on this cloud, each starting from a stopped pool."""
    bench.wait_stopped(180)
    hold = pool_throughput(bench, "hold", args.pool_jobs, args.pool_seconds)
    bench.wait_stopped(180)
    cpu = pool_throughput(bench, "compute", args.cpu_pool_jobs, args.pool_seconds)
    return {"hold": hold, "compute": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=50, help="sequential jobs for the overhead (default 50)")
    parser.add_argument("--pool-jobs", type=int, default=32, help="hold jobs per pool run (default 32)")
    parser.add_argument("--cpu-pool-jobs", type=int, default=8, help="CPU-burning jobs per pool run (default 8)")
    parser.add_argument("--pool-seconds", type=float, default=6.0, help="duration of each pool job (default 6)")
    parser.add_argument("--cold-cycles", type=int, default=5, help="single cold jobs for the stage breakdown")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results.json")
    args = parser.parse_args()
    base = Path(os.environ.get("BATCHWORKER_LOCAL_DIR") or REPO_ROOT / ".local-cloud")
    results: dict = {}
    started = time.monotonic()

    console.rule("simulator")
    sim = simulate_all(days=30, seed=0)
    results["sim_seed_billed_over_limit"] = sim["headline"]["sim_seed_billed_over_limit"]
    results["sim_bursty_billed_over_busy"] = sim["headline"]["sim_bursty_billed_over_busy"]
    results["sim_bursty_original_billed_over_busy"] = sim["headline"]["sim_bursty_original_billed_over_busy"]

    console.rule("one instance: pool baseline, overhead, throughput")
    # The reaper every 6 s (not 60): the idle grace ends on time, so the next pool run starts from stopped.
    options = LocalOptions(boot_delay_seconds=BOOT_DELAY_SECONDS, idle_grace_seconds=60, max_jobs_per_instance=1,
                           schedule_speedup=10)
    with Bench(base / "bench-1", options) as bench:
        one = pools(bench, args)
        results.update(overhead(bench, args.jobs))
        results.update(worker_vs_bare(bench, 100_000))  # ~1 s a run: steadier than 20,000
    results["pool1"] = one
    args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial, should the second cloud fail
    console.rule("four instances: pool throughput, cold stages")
    options = LocalOptions(boot_delay_seconds=BOOT_DELAY_SECONDS, idle_grace_seconds=0, instance_count=4,
                           max_jobs_per_instance=1)
    with Bench(base / "bench-4", options) as bench:
        four = pools(bench, args)
        results.update(cold_cycles(bench, args.cold_cycles))
    del results["pool1"]
    results["pool1_jobs_per_s"], results["pool4_jobs_per_s"] = one["hold"], four["hold"]
    results["pool4_efficiency"] = four["hold"] / (4 * one["hold"])
    results["pool4_efficiency_cpu_bound"] = four["compute"] / (4 * one["compute"])
    results["wall_time_s"] = time.monotonic() - started
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title=f"bench ({args.out.name})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results.items():
        if isinstance(value, dict):
            for stage, numbers in value.items():
                table.add_row(f"{name}: upload->{stage} p50/p95 s", f"{numbers['p50_s']:.2f} / {numbers['p95_s']:.2f}")
        else:
            table.add_row(name, f"{value:.3f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
