"""The job table (DynamoDB): one item per job, every transition a conditional write."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.errors import RetryableError
from batchworker.models import ACTIVE_STATUSES, Job, JobStatus, isoformat, utc_now

logger = logging.getLogger(__name__)

STATUS_INDEX = "status-index"
BATCH_GET_KEYS = 100  # BatchGetItem's limit
UNPROCESSED_RETRIES = 8


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
            if _is_condition_failure(exc):
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
        values = {":to": {"S": to.value}, ":u": {"S": isoformat(moment)}}
        sets = ["#s = :to", "updated_at = :u"]
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
            if _is_condition_failure(exc):
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
            if _is_condition_failure(exc):
                return False
            raise
        return True

    def get(self, job_id: str) -> Job | None:
        item = self.client.get_item(TableName=self.table_name, Key={"job_id": {"S": job_id}}, ConsistentRead=True)
        return _to_job(item["Item"]) if "Item" in item else None

    def get_many(self, job_ids: Iterable[str]) -> dict[str, Job]:
        """The jobs that exist among `job_ids`, strongly consistent, in as few BatchGetItem calls as fit (100 keys)."""
        wanted = sorted(set(job_ids))
        found: dict[str, Job] = {}
        for start in range(0, len(wanted), BATCH_GET_KEYS):
            request = {self.table_name: {"Keys": [{"job_id": {"S": j}} for j in wanted[start : start + BATCH_GET_KEYS]],
                                         "ConsistentRead": True}}
            for attempt in range(UNPROCESSED_RETRIES + 1):
                response = self.client.batch_get_item(RequestItems=request)
                for item in response.get("Responses", {}).get(self.table_name, []):
                    job = _to_job(item)
                    found[job.job_id] = job
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                if attempt == UNPROCESSED_RETRIES:
                    raise RetryableError(f"DynamoDB left {len(request[self.table_name]['Keys'])} job reads unprocessed")
                time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))  # throttled: back off, with jitter
        return found

    def by_status(self, status: JobStatus) -> Iterator[Job]:
        paginator = self.client.get_paginator("query")
        for page in paginator.paginate(
            TableName=self.table_name,
            IndexName=STATUS_INDEX,
            KeyConditionExpression="#s = :s",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":s": {"S": status.value}},
        ):
            for item in page.get("Items", []):
                yield _to_job(item)

    def active(self) -> list[Job]:
        """Jobs that still need an instance: queued, dispatched or running, each once.

        One query per status, in the order jobs move (queued, dispatched, running): a job that moves on
        between two queries is seen twice, and counted twice it would make its instance look busier than
        it is (placement then skips it, and one instance ends up with more of a burst than the others).
        The later sighting is the newer state.
        """
        return list({job.job_id: job for status in ACTIVE_STATUSES for job in self.by_status(status)}.values())

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


def _is_condition_failure(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
