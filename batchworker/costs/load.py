"""Load model: the AWS API calls per second each component makes at a given upload rate or burst, vs the limits.

Steady state by Little's law (concurrent jobs = upload rate x job time), counted per API from what the code
does per upload, per trigger batch, per dispatcher invocation, per manifest, per stop decision and per reaper
pass, for the code before issue 15 ("today") and after it ("after"). The per-job counts are checked against
a recording of a real local run (`scripts/record_calls.py`, `simulate --load --recorded FILE`). A burst is
modelled as its uploads arriving within `burst_arrival_seconds`, every instance of the pool booting at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

ITEM_BYTES = 1024  # a job item with its attributes: one write unit, a quarter of a strongly consistent read unit
INDEX_ENTRY_BYTES = 512  # after: a status-index entry, without the lease and the progress (INCLUDE projection)
STATUS_SHARDS = 2  # after: partitions per status in the status index (batchworker/jobs.py)
INDEX_WRITES_PER_JOB = 3  # the most index writes one job makes in one status partition (in, a change, out)
DAY_WORK_SECONDS = 8 * 3600.0

# Published limits, per second (account and Region unless said otherwise).
LIMITS = {
    "ec2:DescribeInstances": (20.0, "EC2 request bucket of non-mutating actions: 100 tokens, refill 20/s"),
    "ec2:StartInstances": (5.0, "EC2 mutating actions: refill 5/s"),
    "ec2:StopInstances": (5.0, "EC2 mutating actions: refill 5/s"),
    "ssm:GetParameter": (40.0, "SSM GetParameter, standard throughput (higher throughput: 10,000)"),
    "dynamodb:status-index hot partition writes": (1000.0, "DynamoDB: 1,000 write units/s per partition"),
    "dynamodb:status-index reads (RCU)": (3000.0, "DynamoDB: 3,000 read units/s per partition (the busiest)"),
    "lambda:concurrent executions": (1000.0, "Lambda: 1,000 concurrent executions per Region (default quota)"),
}


@dataclass(frozen=True)
class Workload:
    name: str
    uploads_per_minute: float  # at the peak
    job_seconds: float
    burst_uploads: int = 0  # > 0: a burst of this many uploads, arriving within burst_arrival_seconds
    burst_arrival_seconds: float = 60.0

    def scaled(self, factor: float) -> Workload:
        return replace(self, name=f"{self.name} x{factor:g}", uploads_per_minute=self.uploads_per_minute * factor)


# The simulator's traces (batchworker/costs/traces.py), at their peak.
SEED = Workload("seed (4 jobs/day of 20 min)", 4 / (DAY_WORK_SECONDS / 60), 1200.0)
BURSTY = Workload("bursty (30-file bursts, 5-20 s jobs)", 30.0, 12.5)
BIG_BURST = Workload("10,000-upload burst", 0.0, 12.5, burst_uploads=10_000, burst_arrival_seconds=60.0)


@dataclass(frozen=True)
class Deployment:
    version: str = "after"  # "today" (before issue 15) or "after"
    pool_size: int = 20
    max_jobs_per_instance: int = 4
    boot_seconds: float = 90.0  # start request to running (GPU AMI)
    ssm_online_seconds: float = 30.0  # running to SSM agent Online
    lease_seconds: float = 90.0
    reaper_period_seconds: float = 60.0
    sqs_batch_size: int = 10
    transport: str = "ssm"


@dataclass
class Load:
    workload: Workload
    deployment: Deployment
    uploads_per_second: float
    concurrent_jobs: float
    instances: int
    backlog_growth_per_second: float  # > 0: the pool cannot keep up; jobs wait, more every second
    calls: dict[str, dict[str, float]]  # component -> API -> calls/s
    measures: dict[str, float]  # hot-partition writes, read units, concurrency: compared with LIMITS

    def total(self, api: str) -> float:
        return sum(per_api.get(api, 0.0) for per_api in self.calls.values())

    def pressures(self) -> dict[str, tuple[float, float]]:
        """API or measure -> (value per second, fraction of its limit)."""
        values = {api: self.total(api) for api in LIMITS if ":" in api and api in self._apis()}
        values.update(self.measures)
        return {name: (value, value / LIMITS[name][0]) for name, value in values.items() if name in LIMITS}

    def _apis(self) -> set[str]:
        return {api for per_api in self.calls.values() for api in per_api}

    def breaks_first(self) -> str:
        over = sorted(((share, name) for name, (_, share) in self.pressures().items() if share >= 1.0), reverse=True)
        problems = [f"{name} at {share:.0%} of its limit" for share, name in over]
        if self.backlog_growth_per_second > 0:
            problems.append(
                f"the pool ({self.deployment.pool_size} x {self.deployment.max_jobs_per_instance} slots) falls "
                f"behind by {self.backlog_growth_per_second * 60:.0f} jobs/min"
                + ("; jobs that wait past max_job_runtime_seconds fail" if self.deployment.version == "today" else "")
            )
        return "; ".join(problems) or "nothing"


def polls(wait_seconds: float, first: float, growth: float, cap: float, jitter_mean: float = 1.0) -> float:
    """Looks made while waiting `wait_seconds`, the pause starting at `first` and multiplied by `growth` up to `cap`."""
    count, elapsed, pause = 1, 0.0, first
    while elapsed < wait_seconds:
        elapsed += pause * jitter_mean
        count += 1
        pause = min(pause * growth, cap)
    return float(count)


def model(workload: Workload, deployment: Deployment) -> Load:
    d, today = deployment, deployment.version == "today"
    slots = d.max_jobs_per_instance
    if workload.burst_uploads:
        rate = workload.burst_uploads / workload.burst_arrival_seconds
    else:
        rate = workload.uploads_per_minute / 60.0
    wanted = rate * workload.job_seconds  # Little's law
    capacity_instances = d.pool_size
    instances = min(capacity_instances, max(1, math.ceil(wanted / slots))) if rate else 0
    served = min(rate, capacity_instances * slots / workload.job_seconds)
    backlog_growth = max(0.0, rate - served)
    # Active jobs (what the trigger and stop read): running ones, plus the backlog of a burst.
    active = workload.burst_uploads if workload.burst_uploads else wanted
    running = min(wanted, instances * slots)

    batch = min(d.sqs_batch_size, max(1.0, rate))  # uploads gathered per trigger invocation (poll ~1 s)
    batches = rate / batch
    # Least-loaded placement spreads a batch over the instances with the fewest jobs: with every instance
    # busy, each upload of a batch lands on another instance (one dispatcher each).
    per_batch_instances = min(batch, instances) if instances else 0
    dispatchers = batches * per_batch_instances
    starts = (instances / max(workload.burst_arrival_seconds, 1.0)) if workload.burst_uploads else (
        0.0 if wanted >= 1 else rate)  # a busy pool stays up; isolated jobs start an instance each
    booting = workload.burst_uploads > 0 or wanted < 1
    calls: dict[str, dict[str, float]] = {}

    def add(component: str, api: str, per_second: float) -> None:
        calls.setdefault(component, {})
        calls[component][api] = calls[component].get(api, 0.0) + per_second

    # trigger: per batch, the pool and its load; per upload, the job and the ledger.
    add("trigger", "ec2:DescribeInstances", batches)
    if today:  # the load from the active set: 3 GSI queries reading every active job
        add("trigger", "dynamodb:Query", 3 * batches)
        read_units = batches * active * ITEM_BYTES / 4096 * 0.5  # eventually consistent GSI reads
    else:  # the load from the pool's ledger items (BatchGetItem, 100 a call): the index is not read
        add("trigger", "dynamodb:BatchGetItem", batches * max(1, math.ceil(d.pool_size / 100)))
        read_units = 0.0
    add("trigger", "dynamodb:GetItem", batches)  # the pool's idle-gap record
    add("trigger", "dynamodb:PutItem", rate + starts)  # the job; the start's history record
    add("trigger", "dynamodb:UpdateItem", 2 * rate)  # ledger placement (conditional after), job's instance
    add("trigger", "ec2:StartInstances", starts)
    add("trigger", "lambda:Invoke", dispatchers)

    # worker (dispatcher): per invocation, wait for the instance; per job, claim and lease.
    wait = d.boot_seconds if booting else 0.0
    online_wait = d.ssm_online_seconds if booting else 0.0
    if today:
        describe_per_dispatch = polls(wait, 1.0, 1.0, 1.0)
        launching = dispatchers  # every invocation waits for its instance and launches
        dispatcher_seconds = wait + (online_wait if d.transport == "ssm" else 0.0) + 2.0
        concurrency = dispatchers * dispatcher_seconds
        add("worker", "dynamodb:GetItem", 2 * rate)
    else:
        # One dispatcher per instance (its ledger claim: a conditional UpdateItem, and one to let go, or one to hand
        # the jobs over), never waiting through a boot: an invocation looks once (DescribeInstances), and a booting
        # instance's `running` event brings one dispatcher per start, which reads the ledger and the placed jobs.
        describe_per_dispatch = 1.0
        events = 2 * starts  # running, and stopped later
        launching = (starts if booting else dispatchers)
        add("worker", "ec2:DescribeInstances", starts)
        add("worker", "dynamodb:GetItem", 2 * rate + events)  # the job, before and after; the ledger on an event
        add("worker", "dynamodb:BatchGetItem", dispatchers + starts)  # the placed jobs, once per look
        add("worker", "dynamodb:UpdateItem", 2 * (dispatchers + starts))  # claim and let go, or hand over
        dispatcher_seconds = 1.0 + (online_wait if d.transport == "ssm" else 0.0)
        concurrency = dispatchers * 1.0 + events * 0.5 + starts * dispatcher_seconds
    add("worker", "ec2:DescribeInstances", dispatchers * describe_per_dispatch)
    add("worker", "dynamodb:UpdateItem", 2 * rate)
    if d.transport == "ssm":
        add("worker", "ssm:DescribeInstanceInformation", launching * polls(online_wait, 2.0, 1.0, 2.0))
        add("worker", "ssm:SendCommand", launching)
        add("worker", "ssm:GetCommandInvocation", 2 * launching)
    else:
        add("worker", "ssm:GetParameter", launching * polls(wait if today else 0.0, 0.5, 1.0 if today else 2.0,
                                                            0.5 if today else 4.0))
    concurrency += batches * 1.0 + rate / d.sqs_batch_size * 1.0

    # instance (the job): the lease every lease/3 s while on the instance, waiting included; S3 in and out.
    renewals_per_second = running / (d.lease_seconds / 3)
    waiting_on_instances = max(0.0, min(active, instances * slots * 4) - running) if workload.burst_uploads else 0.0
    renewals_per_second += waiting_on_instances / (d.lease_seconds / 3)
    # A renewal as the job arrives, then every lease/3; after, one more write as its code starts.
    add("instance", "dynamodb:UpdateItem", renewals_per_second + rate * (1.0 if today else 2.0))
    add("instance", "s3:HeadObject", rate)  # the input's size and version before the download
    add("instance", "s3:GetObject", rate)
    add("instance", "s3:PutObject", 4 * rate)  # results.csv, errors.jsonl, job.log, manifest

    # stop: per manifest, the job's end; per stop decision (an instance per batch), its ledger item, then (today
    # always; after, only when no job is placed on the instance any more) the pool and the active set.
    decisions = min(rate, (rate / d.sqs_batch_size) * min(d.sqs_batch_size, max(instances, 1))) if rate else 0.0
    # After: an instance's jobs taken as Poisson, the chance it holds none when a decision runs.
    looks = decisions if today else decisions * math.exp(-running / max(instances, 1))
    add("stop", "s3:GetObject", rate)
    add("stop", "dynamodb:UpdateItem", 2 * rate)
    add("stop", "dynamodb:GetItem", rate + decisions + looks)  # the job; the ledger; the idle-gap record
    add("stop", "ec2:DescribeInstances", looks)
    add("stop", "dynamodb:Query", 3 * looks * (1 if today else STATUS_SHARDS))
    entry_bytes = ITEM_BYTES if today else INDEX_ENTRY_BYTES
    read_units += looks * active * entry_bytes / 4096 * 0.5

    # reaper: one pass per period.
    passes = 1.0 / d.reaper_period_seconds
    if today:
        add("reaper", "ec2:DescribeInstances", passes * (1 + instances))
        add("reaper", "dynamodb:Query", passes * 3 * (1 + instances))
        add("reaper", "dynamodb:GetItem", passes * 3 * instances)
        read_units += passes * (1 + instances) * active * ITEM_BYTES / 4096 * 0.5
    else:
        # The pool, its ledger items and the active jobs: found in the index, then read with their leases.
        add("reaper", "ec2:DescribeInstances", passes)
        add("reaper", "dynamodb:BatchGetItem",
            passes * (max(1, math.ceil(instances / 100)) + math.ceil(active / 100)))
        add("reaper", "dynamodb:Query", passes * 3 * STATUS_SHARDS)
        add("reaper", "dynamodb:GetItem", passes)
        read_units += passes * active * INDEX_ENTRY_BYTES / 4096 * 0.5

    if today:
        # Every write of a job item rewrites its status-index entry (projection ALL): the lease renewals of
        # all jobs on the instances land on the partitions of two status values, beside each job's moves.
        hot_writes = renewals_per_second * math.ceil(ITEM_BYTES / 1024) + INDEX_WRITES_PER_JOB * rate
    else:
        # Renewals write nothing the index carries; each job's moves spread over the shards of its status,
        # and the reads of the active set over the shards of each status.
        hot_writes = INDEX_WRITES_PER_JOB * rate / STATUS_SHARDS
        read_units /= STATUS_SHARDS
    measures = {
        "dynamodb:status-index hot partition writes": hot_writes,
        "dynamodb:status-index reads (RCU)": read_units,
        "lambda:concurrent executions": concurrency,
    }
    return Load(workload, deployment, rate, wanted, instances, backlog_growth,
                {c: {a: v for a, v in apis.items() if v} for c, apis in calls.items()}, measures)


def levels() -> list[Workload]:
    """What `simulate --load` prints: the seed and bursty traces at 1x-1000x, and the 10,000-upload burst."""
    return [*(SEED.scaled(f) for f in (1, 10, 100, 1000)), *(BURSTY.scaled(f) for f in (1, 10, 100, 1000)),
            BIG_BURST]


def per_job_calls(recording: dict) -> dict[str, dict[str, float]]:
    """Calls per job by component and API in one scenario of a recording (scripts/record_calls.py).

    The reaper's are per pass (it runs on a clock, not per job); the emulators' own ("other") are left out.
    """
    jobs, passes = max(recording["jobs"], 1), max(recording.get("reaper_passes", 0), 1)
    return {
        component: {api: count / (passes if component == "reaper" else jobs) for api, count in apis.items()}
        for component, apis in recording["calls"].items()
        if component != "other"
    }
