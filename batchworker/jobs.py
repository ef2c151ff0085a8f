"""The job table (DynamoDB): one item per job, every transition a conditional write.

Jobs are found by status through `status-shard-index`: its partition key `status_shard` is the status and a
shard number derived from the job id ("RUNNING#1"), so one status is STATUS_SHARDS partitions and none takes
more than its share of the writes. Its projection leaves out what a running job's lease renewals write
(`lease_expires_at`, `items_done`, `items_total`; the renewals write nothing else), so they never write to the
index. Readers that need those attributes read the items themselves (`active`, one BatchGetItem per 100 jobs).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.models import ACTIVE_STATUSES, Job, JobStatus, isoformat, utc_now

logger = logging.getLogger(__name__)

STATUS_INDEX = "status-shard-index"
STATUS_SHARDS = 2  # changing it moves every job to another partition: existing rows would need rewriting
SHARD_ATTRIBUTE = "status_shard"
# What the index carries besides its keys (job_id, status_shard, created_at): all its readers use, and none of
# what a lease renewal writes (terraform/dynamodb.tf has the same list).
INDEX_ATTRIBUTES = (
    "status", "input_bucket", "input_key", "input_version", "input_size_bytes", "instance_id", "updated_at",
    "attempts", "retries", "running_since", "last_error", "manifest_key", "placed_at", "waiting_reason",
    "capacity_wait_since", "package_name", "package_version", "package_uri", "params",
)
RENEWED_ATTRIBUTES = ("lease_expires_at", "items_done", "items_total")  # worker/lease.py's plain renewal


def status_shard(job_id: str, status: JobStatus | str) -> str:
    """The job's partition of the status index, e.g. "QUEUED#1" (worker/lease.py computes the same)."""
    value = status.value if isinstance(status, JobStatus) else status
    return f"{value}#{zlib.crc32(job_id.encode()) % STATUS_SHARDS}"


def status_shards(status: JobStatus | str) -> list[str]:
    """Every partition of one status in the status index."""
    value = status.value if isinstance(status, JobStatus) else status
    return [f"{value}#{n}" for n in range(STATUS_SHARDS)]


class JobStore:
    """Reads and writes jobs; `table_name` is the `<prefix>-jobs` table."""

    def __init__(self, table_name: str, client=None, retention_days: float | None = None):
        self.table_name = table_name
        self.client = client or aws.client("dynamodb")
        self.retention_days = retention_days  # a final job's row expires (TTL `expires_at`) this long after

    def create_queued(self, job: Job, now: datetime | None = None) -> bool:
        """Record a new QUEUED job. False when the job already exists (a duplicate delivery)."""
        stamp = isoformat(now or utc_now())
        item = {
            "job_id": {"S": job.job_id},
            "status": {"S": JobStatus.QUEUED.value},
            SHARD_ATTRIBUTE: {"S": status_shard(job.job_id, JobStatus.QUEUED)},
            "input_bucket": {"S": job.input_bucket},
            "input_key": {"S": job.input_key},
            "created_at": {"S": stamp},
            "updated_at": {"S": stamp},
            "attempts": {"N": "0"},
        }
        if job.input_version:
            item["input_version"] = {"S": job.input_version}
        if job.input_size_bytes is not None:
            item["input_size_bytes"] = {"N": str(job.input_size_bytes)}
        if job.instance_id:
            item["instance_id"] = {"S": job.instance_id}
        if job.package:
            # Pinned at acceptance: a deploy while the job waits does not change what it runs.
            item["package_name"] = {"S": job.package["name"]}
            item["package_version"] = {"S": job.package["version"]}
            item["package_uri"] = {"S": job.package["uri"]}
            item["params"] = {"S": json.dumps(job.params or {})}
        try:
            self.client.put_item(
                TableName=self.table_name,
                Item=item,
                # One upload is one job: S3 and SQS deliver at least once.
                ConditionExpression="attribute_not_exists(job_id)",
            )
        except ClientError as exc:
            if aws.is_condition_failure(exc):
                return False
            raise
        return True

    def assign_instance(self, job_id: str, instance_id: str) -> None:
        self.client.update_item(
            TableName=self.table_name,
            Key={"job_id": {"S": job_id}},
            # placed_at: when the job got its instance (the soak checks no stop landed on it after that)
            UpdateExpression="SET instance_id = :i, updated_at = :u, placed_at = :u",
            ExpressionAttributeValues={":i": {"S": instance_id}, ":u": {"S": isoformat(utc_now())}},
            ConditionExpression="attribute_exists(job_id)",
        )

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        allowed_from: Iterable[JobStatus],
        instance_id: str | None = None,
        error: str | None = None,
        manifest_key: str | None = None,
        count_attempt: bool = False,
        count_retry: bool = False,
        lease_seconds: float | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Move a job to `to` if its status is one of `allowed_from`; False when it was not."""
        moment = now or utc_now()
        names = {"#s": "status"}
        values = {":to": {"S": to.value}, ":u": {"S": isoformat(moment)}, ":shard": {"S": status_shard(job_id, to)}}
        sets = ["#s = :to", f"{SHARD_ATTRIBUTE} = :shard", "updated_at = :u"]
        removes = []
        # `running_since` is the job's own to set, when its code starts (worker/lease.py): waiting is not running.
        if to is JobStatus.DISPATCHED:
            # an instance was found; what the last one could not reach is for its next run to say again
            removes = ["waiting_reason", "capacity_wait_since", "instance_problem"]
        if to is JobStatus.QUEUED:
            removes = ["lease_expires_at", "running_since"]  # queued again: the next attempt starts afresh
        if to.is_terminal and self.retention_days:
            sets.append("expires_at = :expires")  # the table's TTL attribute: epoch seconds
            values[":expires"] = {"N": str(int(moment.timestamp() + self.retention_days * 86400))}
        if lease_seconds is not None:
            sets.append("lease_expires_at = :lease")
            values[":lease"] = {"S": isoformat(moment + timedelta(seconds=lease_seconds))}
        if instance_id:
            sets.append("instance_id = :i")
            values[":i"] = {"S": instance_id}
        if error is not None:
            sets.append("last_error = :e")
            values[":e"] = {"S": error[:2000]}
        if manifest_key:
            sets.append("manifest_key = :m")
            values[":m"] = {"S": manifest_key}
        update = "SET " + ", ".join(sets)
        counters = [name for name, wanted in (("attempts", count_attempt), ("retries", count_retry)) if wanted]
        if counters:
            update += " ADD " + ", ".join(f"{name} :one" for name in counters)
            values[":one"] = {"N": "1"}
        if removes:
            update += " REMOVE " + ", ".join(removes)
        allowed = [s.value for s in allowed_from]
        placeholders = []
        for n, status in enumerate(allowed):
            values[f":f{n}"] = {"S": status}
            placeholders.append(f":f{n}")
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"job_id": {"S": job_id}},
                UpdateExpression=update,
                # The job must exist (never create one here) and be in a state this step may leave.
                ConditionExpression=f"attribute_exists(job_id) AND #s IN ({', '.join(placeholders)})",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if aws.is_condition_failure(exc):
                return False
            raise
        return True

    def note_waiting_for_capacity(self, job_id: str, reason: str, now: datetime | None = None) -> bool:
        """The job stays QUEUED: no instance could be started for it (EC2 capacity). False if it left QUEUED."""
        stamp = isoformat(now or utc_now())
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"job_id": {"S": job_id}},
                UpdateExpression=(
                    "SET waiting_reason = :r, updated_at = :u, capacity_wait_since = if_not_exists(capacity_wait_since, :u)"
                ),
                # Only a job still waiting for an instance: never a dispatched or finished one.
                ConditionExpression="attribute_exists(job_id) AND #s = :queued",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":r": {"S": reason[:1000]}, ":u": {"S": stamp}, ":queued": {"S": JobStatus.QUEUED.value},
                },
            )
        except ClientError as exc:
            if aws.is_condition_failure(exc):
                return False
            raise
        return True

    def get(self, job_id: str) -> Job | None:
        item = self.client.get_item(TableName=self.table_name, Key={"job_id": {"S": job_id}}, ConsistentRead=True)
        return _to_job(item["Item"]) if "Item" in item else None

    def get_many(self, job_ids: Iterable[str]) -> dict[str, Job]:
        """The jobs with these ids that exist, read strongly consistent in BatchGetItem calls of 100 keys."""
        items = aws.batch_get(self.client, self.table_name, [{"job_id": {"S": job_id}} for job_id in job_ids])
        return {item["job_id"]["S"]: _to_job(item) for item in items}

    def by_status(self, status: JobStatus) -> Iterator[Job]:
        """Jobs of one status as the index shows them: without the attributes it does not project (the lease,
        the progress); a job that changed status a moment ago may still show its old one."""
        paginator = self.client.get_paginator("query")
        for shard in status_shards(status):
            for page in paginator.paginate(
                TableName=self.table_name,
                IndexName=STATUS_INDEX,
                KeyConditionExpression=f"{SHARD_ATTRIBUTE} = :s",
                ExpressionAttributeValues={":s": {"S": shard}},
            ):
                for item in page.get("Items", []):
                    yield _to_job(item)

    def active_in_index(self) -> list[Job]:
        """Jobs the index shows queued, dispatched or running, each once (without lease and progress).

        One query per status and shard, in the order jobs move (queued, dispatched, running): a job that moves
        on between two queries is seen twice, and counted twice it would make its instance look busier than it
        is. The later sighting is the newer state.
        """
        return list({job.job_id: job for status in ACTIVE_STATUSES for job in self.by_status(status)}.values())

    def active(self) -> list[Job]:
        """Active jobs with every attribute (lease included), read from the table: the index finds them, then
        one strongly consistent BatchGetItem per 100 jobs reads them; a job that ended meanwhile is left out."""
        found = self.active_in_index()
        current = self.get_many(job.job_id for job in found)
        return [current[job.job_id] for job in found if job.job_id in current and not current[job.job_id].status.is_terminal]

    def backfill_status_shards(self) -> int:
        """Give every job written before the sharded index its `status_shard` (upgrades); returns how many.

        Each write is conditional on the status it read, so a job that moves meanwhile keeps the shard its own
        transition wrote.
        """
        done = 0
        pages = self.client.get_paginator("scan").paginate(
            TableName=self.table_name, ProjectionExpression="job_id, #s, " + SHARD_ATTRIBUTE,
            ExpressionAttributeNames={"#s": "status"},
        )
        for item in (item for page in pages for item in page.get("Items", [])):
            job_id, status = item["job_id"]["S"], item["status"]["S"]
            if item.get(SHARD_ATTRIBUTE, {}).get("S") == status_shard(job_id, status):
                continue
            try:
                self.client.update_item(
                    TableName=self.table_name,
                    Key={"job_id": {"S": job_id}},
                    UpdateExpression=f"SET {SHARD_ATTRIBUTE} = :shard",
                    ConditionExpression="#s = :status",  # still the status the shard is made from
                    ExpressionAttributeNames={"#s": "status"},
                    ExpressionAttributeValues={":shard": {"S": status_shard(job_id, status)}, ":status": {"S": status}},
                )
                done += 1
            except ClientError as exc:
                if not aws.is_condition_failure(exc):
                    raise
        return done

    def all(self) -> list[Job]:
        jobs = []
        for page in self.client.get_paginator("scan").paginate(TableName=self.table_name):
            jobs.extend(_to_job(item) for item in page.get("Items", []))
        return sorted(jobs, key=lambda job: job.created_at)


def _to_job(item: dict) -> Job:
    def s(name: str) -> str | None:
        return item[name]["S"] if name in item else None

    def n(name: str) -> int | None:
        return int(item[name]["N"]) if name in item else None

    return Job(
        job_id=item["job_id"]["S"],
        status=JobStatus(item["status"]["S"]),
        input_bucket=s("input_bucket") or "",
        input_key=s("input_key") or "",
        input_version=s("input_version"),
        input_size_bytes=n("input_size_bytes"),
        instance_id=s("instance_id"),
        created_at=s("created_at") or "",
        updated_at=s("updated_at") or "",
        error=s("last_error"),
        manifest_key=s("manifest_key"),
        attempts=n("attempts") or 0,
        retries=n("retries") or 0,
        running_since=s("running_since"),
        lease_expires_at=s("lease_expires_at"),
        waiting_reason=s("waiting_reason"),
        capacity_wait_since=s("capacity_wait_since"),
        package=(
            {"name": s("package_name"), "version": s("package_version"), "uri": s("package_uri")}
            if "package_name" in item else None
        ),
        params=json.loads(item["params"]["S"]) if "params" in item else None,
        items_done=n("items_done"),
        items_total=n("items_total"),
        instance_problem=s("instance_problem"),
    )
