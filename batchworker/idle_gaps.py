"""How long the pool sat idle before work came back: what the adaptive idle grace learns from.

One record in the instance-events table (partition `~pool`): `idle_since` while nothing is queued or
running anywhere in the pool, and the last RECENT_GAPS gaps (idle_since -> next upload), newest last.
It only tunes cost: an update lost in a race makes one grace less informed; it never touches a job.
"""

from __future__ import annotations

from datetime import datetime

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.decisions import RECENT_GAPS
from batchworker.models import isoformat, parse_time, utc_now

POOL_KEY = {"instance_id": {"S": "~pool"}, "at": {"S": "~gaps"}}  # no instance id starts with "~"


class IdleGaps:
    def __init__(self, table_name: str, client=None):
        self.table_name = table_name
        self.client = client or aws.client("dynamodb")

    def _read(self) -> dict:
        return self.client.get_item(TableName=self.table_name, Key=POOL_KEY, ConsistentRead=True).get("Item", {})

    def recent(self) -> list[float]:
        """The recent gaps in seconds, oldest first."""
        return [float(gap["N"]) for gap in self._read().get("gaps", {}).get("L", [])]

    def note_idle(self, now: datetime | None = None) -> None:
        """Nothing is queued or running in the pool: a gap starts now (unless one is already open)."""
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=POOL_KEY,
                UpdateExpression="SET idle_since = :now",
                ConditionExpression="attribute_not_exists(idle_since)",
                ExpressionAttributeValues={":now": {"S": isoformat(now or utc_now())}},
            )
        except ClientError as exc:
            if not aws.is_condition_failure(exc):
                raise

    def note_arrival(self, now: datetime | None = None) -> float | None:
        """Work arrived: close the open gap, if any, and return its length."""
        item = self._read()
        if "idle_since" not in item:
            return None
        now = now or utc_now()
        gap = max(0.0, (now - parse_time(item["idle_since"]["S"])).total_seconds())
        gaps = [*item.get("gaps", {}).get("L", []), {"N": f"{gap:.3f}"}][-RECENT_GAPS:]
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=POOL_KEY,
                UpdateExpression="SET gaps = :gaps REMOVE idle_since",
                ConditionExpression="idle_since = :seen",  # another trigger closed this gap first
                ExpressionAttributeValues={":gaps": {"L": gaps}, ":seen": item["idle_since"]},
            )
        except ClientError as exc:
            if aws.is_condition_failure(exc):
                return None
            raise
        return gap
