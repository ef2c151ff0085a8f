"""The pool of tagged GPU instances: find by tag and state, start, stop, and record every change."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import datetime

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.errors import InstanceReadyTimeout, InsufficientCapacity, NoInstanceAvailable
from batchworker.models import POOL_TAG_KEY, Instance, InstanceState, isoformat, utc_now

logger = logging.getLogger(__name__)

# Start refusals that pass: the instance is still stopping, AWS has no GPU capacity right now, throttling.
CAPACITY_ERROR = "InsufficientInstanceCapacity"
TRANSIENT_START_ERRORS = frozenset(
    {"IncorrectInstanceState", "InsufficientInstanceCapacity"} | aws.THROTTLING_CODES
)


class InstanceHistory:
    """Every start and stop this system asks for, per instance (the `<prefix>-instance-events` table)."""

    def __init__(self, table_name: str, client=None, retention_days: float | None = None):
        self.table_name = table_name
        self.client = client or aws.client("dynamodb")
        self.retention_days = retention_days  # events expire (TTL `expires_at`); ledger and pool records never

    def record(self, instance_id: str, state: str, reason: str, now: datetime | None = None) -> None:
        moment = now or utc_now()
        self.client.put_item(
            TableName=self.table_name,
            Item={
                "instance_id": {"S": instance_id},
                # The nanosecond suffix keeps two records of one millisecond apart.
                "at": {"S": f"{isoformat(moment)}#{time.monotonic_ns() % 10**9:09d}"},
                "state": {"S": state},
                "reason": {"S": reason[:500]},
                **({"expires_at": {"N": str(int(moment.timestamp() + self.retention_days * 86400))}}
                   if self.retention_days else {}),
            },
        )

    def events(self, instance_id: str) -> list[dict]:
        items = []
        paginator = self.client.get_paginator("query")
        for page in paginator.paginate(
            TableName=self.table_name,
            # The ledger record shares the table under a sort key that sorts after every timestamp.
            KeyConditionExpression="instance_id = :i AND #at < :ledger",
            ExpressionAttributeNames={"#at": "at"},
            ExpressionAttributeValues={":i": {"S": instance_id}, ":ledger": {"S": "~"}},
        ):
            items.extend(page.get("Items", []))
        return [
            {
                "instance_id": instance_id,
                "at": item["at"]["S"].split("#")[0],
                "state": item["state"]["S"],
                "reason": item.get("reason", {}).get("S", ""),
            }
            for item in items
        ]


class InstancePool:
    """Instances carrying `batchworker:pool = pool_tag`; found by tag and state, never by a stored id."""

    def __init__(
        self,
        pool_tag: str,
        history: InstanceHistory | None = None,
        client=None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float], float] = lambda seconds: random.uniform(seconds / 2, seconds),
    ):
        self.pool_tag = pool_tag
        self.history = history
        self.client = client or aws.client("ec2")
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter

    def list(self) -> list[Instance]:
        instances = []
        paginator = self.client.get_paginator("describe_instances")
        for page in paginator.paginate(Filters=[{"Name": f"tag:{POOL_TAG_KEY}", "Values": [self.pool_tag]}]):
            for reservation in page["Reservations"]:
                for raw in reservation["Instances"]:
                    state = InstanceState(raw["State"]["Name"])
                    if state in (InstanceState.TERMINATED, InstanceState.SHUTTING_DOWN):
                        continue
                    instances.append(Instance(
                        raw["InstanceId"], state, raw.get("InstanceType", ""), raw.get("LaunchTime"),
                        raw.get("Placement", {}).get("AvailabilityZone"),
                    ))
        return sorted(instances, key=lambda i: i.instance_id)

    def get(self, instance_id: str) -> Instance:
        for instance in self.list():
            if instance.instance_id == instance_id:
                return instance
        raise NoInstanceAvailable(f"instance {instance_id} is not in pool {self.pool_tag!r} (terminated?)")

    def try_start(self, instance_id: str, reason: str) -> bool:
        """Start without blocking; a transient refusal (no capacity, still stopping) is left to the worker."""
        try:
            self.start(instance_id, reason)
        except ClientError as exc:
            if aws.error_code(exc) not in TRANSIENT_START_ERRORS:
                raise
            logger.warning("start of %s refused for now (%s); the worker will retry", instance_id, aws.error_code(exc))
            return False
        return True

    def start(self, instance_id: str, reason: str) -> None:
        self.client.start_instances(InstanceIds=[instance_id])
        logger.info("started instance %s: %s", instance_id, reason)
        if self.history:
            self.history.record(instance_id, "start", reason)

    def stop(self, instance_id: str, reason: str) -> None:
        self.client.stop_instances(InstanceIds=[instance_id])
        logger.info("stopped instance %s: %s", instance_id, reason)
        if self.history:
            self.history.record(instance_id, "stop", reason)

    def ensure_running(
        self, instance_id: str, deadline: float, reason: str, poll_seconds: float = 1.0,
        capacity_retry_seconds: float | None = None, max_poll_seconds: float = 5.0,
    ) -> Instance:
        """Block until the instance is running, starting it (again) when it is stopped or was stopping.

        Looks grow apart (jittered, from `poll_seconds` up to `max_poll_seconds`), so that many dispatchers
        waiting on booting instances do not add up to a DescribeInstances storm. Transient refusals (no
        capacity, still stopping) and throttling that outlasts botocore's retries back off with jitter up to
        60 s, within the deadline. With `capacity_retry_seconds`, InsufficientInstanceCapacity for that long
        raises InsufficientCapacity instead, so the caller can try an instance in another Availability Zone.
        """
        poll, backoff, last_refusal, short_since = poll_seconds, poll_seconds, "", None
        while True:
            try:
                instance = self.get(instance_id)
            except ClientError as exc:
                if not aws.is_throttling(exc) or self.clock() >= deadline:
                    raise
                backoff = min(backoff * 2, 60.0)
                logger.warning("DescribeInstances throttled; looking again in up to %.0fs", backoff)
                self.sleep(min(self.jitter(backoff), max(deadline - self.clock(), 0.0) + 0.01))
                continue
            if instance.state is InstanceState.RUNNING:
                return instance
            wait = self.jitter(poll)
            poll = min(poll * 2, max_poll_seconds)
            if instance.state is InstanceState.STOPPED:
                try:
                    self.start(instance_id, reason)
                    backoff = poll_seconds
                except ClientError as exc:
                    if aws.error_code(exc) not in TRANSIENT_START_ERRORS:
                        raise
                    if aws.error_code(exc) == CAPACITY_ERROR and capacity_retry_seconds is not None:
                        short_since = self.clock() if short_since is None else short_since
                        if self.clock() - short_since >= capacity_retry_seconds:
                            zone = instance.availability_zone or "its Availability Zone"
                            raise InsufficientCapacity(
                                f"{CAPACITY_ERROR}: no {instance.instance_type or 'GPU'} capacity for {instance_id} "
                                f"in {zone}", (instance_id,), tuple(filter(None, [instance.availability_zone])),
                            ) from exc
                    last_refusal = f"; last start refused with {aws.error_code(exc)}"
                    backoff = min(backoff * 2, 60.0)
                    wait = self.jitter(backoff)
            if self.clock() >= deadline:
                raise InstanceReadyTimeout(
                    f"instance {instance_id} is still {instance.state.value}; it did not reach running in time"
                    + last_refusal
                )
            self.sleep(min(wait, max(deadline - self.clock(), 0.0) + 0.01))


