"""Per-instance coordination record: lets a stop and a new assignment never cross unseen.

Every job placed on an instance bumps the instance's `generation`. A stop is claimed with a conditional
write on the generation read *before* looking for active jobs: if a job was placed in between, the claim
fails and the instance stays up; if two finished jobs race to stop it, only one claim succeeds.
The record lives in the instance-events table under a sort key no timestamp can take.

It also holds `placed`: the ids of the jobs placed on the instance and not finished yet (a string set, added
at placement, removed when the job's manifest is recorded). The stop decision reads it with a strongly
consistent GetItem, so it never depends on the jobs table's status index, which on AWS lags behind writes:
a job placed a moment ago is always seen. A set rather than a counter: adding or removing the same job twice
(retried deliveries) changes nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.errors import RetryableError
from batchworker.models import isoformat, parse_time, utc_now

LEDGER_SORT_KEY = "~ledger"  # sorts after every ISO-8601 history entry
PLACED = "placed"  # string set: jobs placed on the instance whose manifests are not recorded yet
BATCH_GET_KEYS = 100  # BatchGetItem's limit
UNPROCESSED_RETRIES = 8


@dataclass(frozen=True)
class LedgerEntry:
    instance_id: str
    generation: int = 0
    stopped_generation: int | None = None
    last_activity_at: datetime | None = None
    placed_job_ids: frozenset[str] = frozenset()

    @property
    def is_stop_claimed(self) -> bool:
        return self.stopped_generation == self.generation


class InstanceLedger:
    def __init__(self, table_name: str, client=None, sleep: Callable[[float], None] = time.sleep):
        self.table_name = table_name
        self.client = client or aws.client("dynamodb")
        self.sleep = sleep

    def _key(self, instance_id: str) -> dict:
        return {"instance_id": {"S": instance_id}, "at": {"S": LEDGER_SORT_KEY}}

    def read(self, instance_id: str) -> LedgerEntry:
        item = self.client.get_item(TableName=self.table_name, Key=self._key(instance_id), ConsistentRead=True).get(
            "Item", {}
        )
        return _to_entry(instance_id, item)

    def read_many(self, instance_ids: Iterable[str]) -> dict[str, LedgerEntry]:
        """The entries of many instances in as few strongly consistent BatchGetItem calls as fit (100 keys each)."""
        wanted = list(dict.fromkeys(instance_ids))
        items: dict[str, dict] = {}
        for start in range(0, len(wanted), BATCH_GET_KEYS):
            request = {
                self.table_name: {"Keys": [self._key(i) for i in wanted[start : start + BATCH_GET_KEYS]],
                                  "ConsistentRead": True}
            }
            for attempt in range(UNPROCESSED_RETRIES + 1):
                response = self.client.batch_get_item(RequestItems=request)
                for item in response.get("Responses", {}).get(self.table_name, []):
                    items[item["instance_id"]["S"]] = item
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                if attempt == UNPROCESSED_RETRIES:
                    raise RetryableError(f"DynamoDB left {len(request[self.table_name]['Keys'])} ledger reads unprocessed")
                self.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))  # throttled: back off, with jitter
        return {i: _to_entry(i, items.get(i, {})) for i in wanted}

    def note_assignment(self, instance_id: str, now: datetime | None = None, job_ids: Iterable[str] = ()) -> int:
        """Jobs were placed on the instance: any stop decided on an older generation is void, and until their
        manifests are recorded the instance has work (`placed`). Returns the new generation."""
        values = {":one": {"N": "1"}, ":now": {"S": isoformat(now or utc_now())}}
        update = "ADD generation :one"
        if job_ids := sorted(set(job_ids)):
            update += f", {PLACED} :jobs"
            values[":jobs"] = {"SS": job_ids}
        response = self.client.update_item(
            TableName=self.table_name,
            Key=self._key(instance_id),
            UpdateExpression=update + " SET last_activity_at = :now",
            ExpressionAttributeValues=values,
            ReturnValues="UPDATED_NEW",
        )
        return int(response["Attributes"]["generation"]["N"])

    def note_activity(self, instance_id: str, now: datetime | None = None, job_ids: Iterable[str] = ()) -> None:
        """Jobs finished on the instance (their manifests are recorded): its idle time counts from now."""
        values = {":now": {"S": isoformat(now or utc_now())}}
        update = "SET last_activity_at = :now"
        if job_ids := sorted(set(job_ids)):
            update += f" DELETE {PLACED} :jobs"
            values[":jobs"] = {"SS": job_ids}
        self.client.update_item(
            TableName=self.table_name,
            Key=self._key(instance_id),
            UpdateExpression=update,
            ExpressionAttributeValues=values,
        )

    def release(self, instance_id: str, job_ids: Iterable[str]) -> None:
        """Forget placements that ended without a recorded manifest (the reaper's repair); idle time unchanged."""
        if job_ids := sorted(set(job_ids)):
            self.client.update_item(
                TableName=self.table_name,
                Key=self._key(instance_id),
                UpdateExpression=f"DELETE {PLACED} :jobs",
                ExpressionAttributeValues={":jobs": {"SS": job_ids}},
            )

    def claim_stop(self, instance_id: str, generation: int) -> bool:
        """True for exactly one caller per generation, and only if no job was placed since it was read."""
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=self._key(instance_id),
                UpdateExpression="SET stopped_generation = :g, generation = if_not_exists(generation, :zero)",
                ConditionExpression=(
                    # nothing was assigned since the caller read the generation
                    "(attribute_not_exists(generation) OR generation = :g)"
                    # and no job is placed on it right now (an empty set is no attribute in DynamoDB)
                    f" AND attribute_not_exists({PLACED})"
                    # and nobody has claimed the stop of this generation yet
                    " AND (attribute_not_exists(stopped_generation) OR stopped_generation <> :g)"
                ),
                ExpressionAttributeValues={":g": {"N": str(generation)}, ":zero": {"N": "0"}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise
        return True


def _to_entry(instance_id: str, item: dict) -> LedgerEntry:
    return LedgerEntry(
        instance_id=instance_id,
        generation=int(item.get("generation", {}).get("N", "0")),
        stopped_generation=int(item["stopped_generation"]["N"]) if "stopped_generation" in item else None,
        last_activity_at=parse_time(item["last_activity_at"]["S"]) if "last_activity_at" in item else None,
        placed_job_ids=frozenset(item.get(PLACED, {}).get("SS", [])),
    )
