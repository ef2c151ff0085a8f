"""Per-instance coordination record: lets a stop and a new assignment never cross unseen.

Every job placed on an instance bumps the instance's `generation`. A stop is claimed with a conditional
write on the generation read *before* looking for active jobs: if a job was placed in between, the claim
fails and the instance stays up; if two finished jobs race to stop it, only one claim succeeds.
The record lives in the instance-events table under a sort key no timestamp can take.

At a start the trigger also records `prewarm`: the job packages (name -> pinned version) of the jobs that
started the instance, which the instance's boot-time pre-warm reads (worker/prewarm.py; its role may read
only that attribute). It also holds `placed`: the ids of the jobs placed on the instance and not finished yet (a string set, added
at placement, removed when the job's manifest is recorded). The stop decision reads it with a strongly
consistent GetItem, so it never depends on the jobs table's status index, which on AWS lags behind writes:
a job placed a moment ago is always seen. A set rather than a counter: adding or removing the same job twice
(retried deliveries) changes nothing.

The set's size is also the instance's job counter for placement (`place`): a job is added only while the set
holds fewer than `max_jobs_per_instance` ids, in one conditional write, so trigger batches planning at the same
time cannot overfill an instance. No separate number is kept beside the set: a count that every add, finish
and repair would have to move in step could drift under retried deliveries; the set's size cannot.

And it names the instance's one dispatcher (`dispatcher`, `dispatching_until`): a worker invocation claims the
instance with a conditional write that lapses at `dispatching_until` (a crashed dispatcher holds nobody up
for long). An invocation that finds another dispatcher there hands its jobs over instead of waiting too: it
adds them to `placed` and bumps the generation, and the holder's release, conditional on the generation it
last looked at, then fails, so the holder looks again and launches them. Nothing placed is left behind, and
each job is launched once (its QUEUED -> DISPATCHED claim is conditional too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.errors import RetryableError
from batchworker.models import isoformat, parse_time, utc_now

LEDGER_SORT_KEY = "~ledger"  # sorts after every ISO-8601 history entry
PLACED = "placed"  # string set: jobs placed on the instance whose manifests are not recorded yet
DISPATCHER = "dispatcher"  # the dispatcher (worker invocation) that launches the instance's jobs now
DISPATCHING_UNTIL = "dispatching_until"  # epoch seconds: its claim lapses then (a crashed dispatcher)
HANDOVER_TRIES = 8  # claim, or hand over to the holder; a holder releasing in between makes us try again
PREWARM = "prewarm"  # map: job packages (name -> version) of the jobs that started the instance


@dataclass(frozen=True)
class LedgerEntry:
    instance_id: str
    generation: int = 0
    stopped_generation: int | None = None
    last_activity_at: datetime | None = None
    placed_job_ids: frozenset[str] = frozenset()
    dispatcher: str | None = None
    dispatching_until: float | None = None

    def is_dispatching(self, now: float) -> bool:
        """A dispatcher holds the instance and its claim has not lapsed."""
        return self.dispatcher is not None and (self.dispatching_until or 0.0) >= now

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

    def _update(self, instance_id: str, **request) -> dict:
        return self.client.update_item(TableName=self.table_name, Key=self._key(instance_id), **request)

    def _update_if(self, instance_id: str, **request) -> tuple[bool, dict]:
        """A conditional update of the instance's record: (True, the response) when its condition held, (False,
        the error response: the item as it is, if ReturnValuesOnConditionCheckFailure asked) when it did not."""
        try:
            return True, self._update(instance_id, **request)
        except ClientError as exc:
            if not aws.is_condition_failure(exc):
                raise
            return False, exc.response

    def read(self, instance_id: str) -> LedgerEntry:
        item = self.client.get_item(TableName=self.table_name, Key=self._key(instance_id), ConsistentRead=True).get(
            "Item", {}
        )
        return _to_entry(instance_id, item)

    def read_many(self, instance_ids: Iterable[str]) -> dict[str, LedgerEntry]:
        """The entries of many instances in as few strongly consistent BatchGetItem calls as fit (100 keys each)."""
        wanted = list(dict.fromkeys(instance_ids))
        found = aws.batch_get(self.client, self.table_name, [self._key(i) for i in wanted], self.sleep)
        items = {item["instance_id"]["S"]: item for item in found}
        return {i: _to_entry(i, items.get(i, {})) for i in wanted}

    def note_assignment(self, instance_id: str, now: datetime | None = None, job_ids: Iterable[str] = ()) -> int:
        """Jobs were placed on the instance: any stop decided on an older generation is void, and until their
        manifests are recorded the instance has work (`placed`). Returns the new generation."""
        values = {":one": {"N": "1"}, ":now": {"S": isoformat(now or utc_now())}}
        update = "ADD generation :one"
        if job_ids := sorted(set(job_ids)):
            update += f", {PLACED} :jobs"
            values[":jobs"] = {"SS": job_ids}
        response = self._update(
            instance_id,
            UpdateExpression=update + " SET last_activity_at = :now",
            ExpressionAttributeValues=values,
            ReturnValues="UPDATED_NEW",
        )
        return int(response["Attributes"]["generation"]["N"])

    def place(self, instance_id: str, job_id: str, max_jobs: int, now: datetime | None = None) -> int | None:
        """Place the job on the instance if it holds fewer than `max_jobs` placed jobs. Returns the new generation,
        or None when the instance is full (another batch may have taken its last slot since the caller read it).

        Like note_assignment, it voids any stop decided on an older generation.
        """
        placed, response = self._update_if(
            instance_id,
            UpdateExpression=f"ADD generation :one, {PLACED} :jobs SET last_activity_at = :now",
            ConditionExpression=(
                # nothing is placed on it (an empty set is no attribute in DynamoDB)
                f"attribute_not_exists({PLACED})"
                # or this job is placed on it already: a retried delivery adds nothing, so it may go on
                f" OR contains({PLACED}, :job)"
                # or it has a free slot: the set's size is its job count
                f" OR size({PLACED}) < :max"
            ),
            ExpressionAttributeValues={
                ":one": {"N": "1"}, ":now": {"S": isoformat(now or utc_now())},
                ":jobs": {"SS": [job_id]}, ":job": {"S": job_id}, ":max": {"N": str(max_jobs)},
            },
            ReturnValues="UPDATED_NEW",
        )
        return int(response["Attributes"]["generation"]["N"]) if placed else None

    def note_activity(self, instance_id: str, now: datetime | None = None, job_ids: Iterable[str] = ()) -> None:
        """Jobs finished on the instance (their manifests are recorded): its idle time counts from now."""
        values = {":now": {"S": isoformat(now or utc_now())}}
        update = "SET last_activity_at = :now"
        if job_ids := sorted(set(job_ids)):
            update += f" DELETE {PLACED} :jobs"
            values[":jobs"] = {"SS": job_ids}
        self._update(instance_id, UpdateExpression=update, ExpressionAttributeValues=values)

    def release(self, instance_id: str, job_ids: Iterable[str]) -> None:
        """Forget placements that ended without a recorded manifest (the reaper's repair); idle time unchanged."""
        if job_ids := sorted(set(job_ids)):
            self._update(instance_id, UpdateExpression=f"DELETE {PLACED} :jobs",
                         ExpressionAttributeValues={":jobs": {"SS": job_ids}})

    def claim_dispatch(
        self, instance_id: str, owner: str, seconds: float, job_ids: Iterable[str] = (), now: float | None = None
    ) -> LedgerEntry | None:
        """Become the instance's one dispatcher for `seconds`, or hand `job_ids` over to the one that is.

        Returns the entry as the claim left it (its generation and `placed`: the jobs to look at), or None when
        another dispatcher holds the instance: the jobs are then in `placed` and the generation is bumped, so
        the holder's `release_dispatch` fails and it launches them before it lets go.
        """
        job_ids = sorted(set(job_ids))
        for _ in range(HANDOVER_TRIES):
            moment = time.time() if now is None else now
            values = {":me": {"S": owner}, ":now": {"N": f"{moment:.3f}"}}
            claimed, response = self._update_if(
                instance_id,
                # generation set if absent: the release compares it
                UpdateExpression=(
                    f"SET {DISPATCHER} = :me, {DISPATCHING_UNTIL} = :until, generation = if_not_exists(generation, :zero)"
                ),
                ConditionExpression=(
                    f"attribute_not_exists({DISPATCHING_UNTIL}) OR {DISPATCHING_UNTIL} < :now OR {DISPATCHER} = :me"
                ),
                ExpressionAttributeValues={**values, ":until": {"N": f"{moment + seconds:.3f}"}, ":zero": {"N": "0"}},
                ReturnValues="ALL_NEW",
            )
            if claimed:
                return _to_entry(instance_id, response["Attributes"])
            # Held by another: hand the jobs over. Written after the jobs were assigned to the instance, so the
            # holder's next look finds them QUEUED there.
            update, handover = "ADD generation :one", {":one": {"N": "1"}}
            if job_ids:
                update += f", {PLACED} :jobs"
                handover[":jobs"] = {"SS": job_ids}
            handed_over, _ = self._update_if(
                instance_id,
                UpdateExpression=update,
                ConditionExpression=f"{DISPATCHING_UNTIL} >= :now AND {DISPATCHER} <> :me",
                ExpressionAttributeValues={**values, **handover},
            )
            if handed_over:
                return None
            # The holder let go (or its claim lapsed) in between: claim it ourselves.
        raise RetryableError(f"could not claim nor hand over instance {instance_id}: its dispatcher keeps changing")

    def release_dispatch(self, instance_id: str, owner: str, generation: int) -> LedgerEntry | None:
        """Let go of the claim if nothing was placed or handed over since `generation`. Returns None when let go;
        else the entry as it is now (still ours: look again at its `placed`; another's: our claim lapsed)."""
        released, response = self._update_if(
            instance_id,
            UpdateExpression=f"REMOVE {DISPATCHER}, {DISPATCHING_UNTIL}",
            ConditionExpression=f"{DISPATCHER} = :me AND generation = :g",
            ExpressionAttributeValues={":me": {"S": owner}, ":g": {"N": str(generation)}},
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
        if released:
            return None
        item = response.get("Item")
        return _to_entry(instance_id, item) if item is not None else self.read(instance_id)

    def drop_dispatch(self, instance_id: str, owner: str) -> None:
        """Let go of the claim whatever changed (the dispatcher gives up; the reaper re-invokes what it left)."""
        self._update_if(  # refused when the claim is not ours any more (lapsed, taken over): nothing to let go
            instance_id,
            UpdateExpression=f"REMOVE {DISPATCHER}, {DISPATCHING_UNTIL}",
            ConditionExpression=f"{DISPATCHER} = :me",
            ExpressionAttributeValues={":me": {"S": owner}},
        )

    def note_start(self, instance_id: str, packages: Mapping[str, str]) -> None:
        """The instance was started for jobs of these packages ({name: pinned version}): its boot-time
        pre-warm (worker/prewarm.py) reads them and sets them up before the first job arrives. Replaces what
        an earlier start left; best effort (a missed record means a job sets its package up itself)."""
        if packages:
            self._update(
                instance_id,
                UpdateExpression=f"SET {PREWARM} = :packages",
                ExpressionAttributeValues={":packages": {"M": {n: {"S": v} for n, v in sorted(packages.items())}}},
            )
        else:
            self._update(instance_id, UpdateExpression=f"REMOVE {PREWARM}")

    def claim_stop(self, instance_id: str, generation: int) -> bool:
        """True for exactly one caller per generation, and only if no job was placed since it was read."""
        claimed, _ = self._update_if(
            instance_id,
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
        return claimed


def _to_entry(instance_id: str, item: dict) -> LedgerEntry:
    return LedgerEntry(
        instance_id=instance_id,
        generation=int(item.get("generation", {}).get("N", "0")),
        stopped_generation=int(item["stopped_generation"]["N"]) if "stopped_generation" in item else None,
        last_activity_at=parse_time(item["last_activity_at"]["S"]) if "last_activity_at" in item else None,
        placed_job_ids=frozenset(item.get(PLACED, {}).get("SS", [])),
        dispatcher=item[DISPATCHER]["S"] if DISPATCHER in item else None,
        dispatching_until=float(item[DISPATCHING_UNTIL]["N"]) if DISPATCHING_UNTIL in item else None,
    )
