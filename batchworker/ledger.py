"""Per-instance coordination record: lets a stop and a new assignment never cross unseen.

Every job placed on an instance bumps the instance's `generation`. A stop is claimed with a conditional
write on the generation read *before* looking for active jobs: if a job was placed in between, the claim
fails and the instance stays up; if two finished jobs race to stop it, only one claim succeeds.
The record lives in the instance-events table under a sort key no timestamp can take.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import boto3
from botocore.exceptions import ClientError

from batchworker.models import isoformat, parse_time, utc_now

LEDGER_SORT_KEY = "~ledger"  # sorts after every ISO-8601 history entry


@dataclass(frozen=True)
class LedgerEntry:
    instance_id: str
    generation: int = 0
    stopped_generation: int | None = None
    last_activity_at: datetime | None = None

    @property
    def is_stop_claimed(self) -> bool:
        return self.stopped_generation == self.generation


class InstanceLedger:
    def __init__(self, table_name: str, client=None):
        self.table_name = table_name
        self.client = client or boto3.client("dynamodb")

    def _key(self, instance_id: str) -> dict:
        return {"instance_id": {"S": instance_id}, "at": {"S": LEDGER_SORT_KEY}}

    def read(self, instance_id: str) -> LedgerEntry:
        item = self.client.get_item(TableName=self.table_name, Key=self._key(instance_id), ConsistentRead=True).get(
            "Item", {}
        )
        return LedgerEntry(
            instance_id=instance_id,
            generation=int(item.get("generation", {}).get("N", "0")),
            stopped_generation=int(item["stopped_generation"]["N"]) if "stopped_generation" in item else None,
            last_activity_at=parse_time(item["last_activity_at"]["S"]) if "last_activity_at" in item else None,
        )

    def note_assignment(self, instance_id: str, now: datetime | None = None) -> None:
        """A job was placed on the instance: any stop decided on an older generation is void."""
        self.client.update_item(
            TableName=self.table_name,
            Key=self._key(instance_id),
            UpdateExpression="ADD generation :one SET last_activity_at = :now",
            ExpressionAttributeValues={":one": {"N": "1"}, ":now": {"S": isoformat(now or utc_now())}},
        )

    def note_activity(self, instance_id: str, now: datetime | None = None) -> None:
        """A job finished on the instance: its idle time counts from now."""
        self.client.update_item(
            TableName=self.table_name,
            Key=self._key(instance_id),
            UpdateExpression="SET last_activity_at = :now",
            ExpressionAttributeValues={":now": {"S": isoformat(now or utc_now())}},
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
