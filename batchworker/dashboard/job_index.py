"""Every job-table read of the dashboard: newest-first pages from the status index, and jobs in a time window.

Never a table scan: each status is STATUS_SHARDS partitions of the status index (`status_shard`, range key
`created_at`), each read newest first, all merged. A page cursor holds, per partition, the index key of the last
job shown. The index does not carry what lease renewals write (progress), so a page's rows are then read from
the table itself (one BatchGetItem).
"""

from __future__ import annotations

import base64
import binascii
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from batchworker import aws
from batchworker.jobs import SHARD_ATTRIBUTE, STATUS_INDEX, status_shard, status_shards
from batchworker.models import JobStatus, isoformat, parse_time

ALL_STATUSES = tuple(JobStatus)
# Items a key-prefix search may read per status and page before it shows what it found so far.
SEARCH_READ_BUDGET = 2000


@dataclass(frozen=True)
class JobRow:
    """One job as the dashboard shows it; optional attributes are None when the table has none."""

    job_id: str
    status: str
    input_bucket: str
    input_key: str
    created_at: str
    updated_at: str
    instance_id: str | None = None
    running_since: str | None = None
    attempts: int = 0
    error: str | None = None
    manifest_key: str | None = None
    package: str | None = None
    package_version: str | None = None
    items_done: int | None = None
    items_total: int | None = None
    params: str | None = None  # JSON text of the job package's resolved parameters

    @property
    def index_key(self) -> dict:
        return {"job_id": {"S": self.job_id}, SHARD_ATTRIBUTE: {"S": self.shard}, "created_at": {"S": self.created_at}}

    @property
    def shard(self) -> str:
        return status_shard(self.job_id, self.status)

    @property
    def is_terminal(self) -> bool:
        return self.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)

    def duration_seconds(self, now: datetime) -> float | None:
        """From the job's start (or its queueing, before it ran) to its end, or to `now` while it is active."""
        start = self.running_since or self.created_at
        if not start:
            return None
        end = parse_time(self.updated_at) if self.is_terminal and self.updated_at else now
        return max(0.0, (end - parse_time(start)).total_seconds())


def row_from_item(item: dict) -> JobRow:
    def s(*names: str) -> str | None:
        for name in names:
            if name in item and "S" in item[name]:
                return item[name]["S"]
        return None

    def n(*names: str) -> int | None:
        for name in names:
            if name in item and "N" in item[name]:
                return int(float(item[name]["N"]))
        return None

    return JobRow(
        job_id=item["job_id"]["S"],
        status=item["status"]["S"],
        input_bucket=s("input_bucket") or "",
        input_key=s("input_key") or "",
        created_at=s("created_at") or "",
        updated_at=s("updated_at") or "",
        instance_id=s("instance_id"),
        running_since=s("running_since"),
        attempts=n("attempts") or 0,
        error=s("last_error"),
        manifest_key=s("manifest_key"),
        package=s("package_name"),
        package_version=s("package_version"),
        items_done=n("items_done"),
        items_total=n("items_total"),
        params=s("params"),
    )


@dataclass
class JobPage:
    rows: list[JobRow]
    next_cursor: str | None
    searched: int = 0
    search_cut_short: bool = False


@dataclass
class _Stream:
    """One partition of the index (a status and shard), read newest first from `start` (an index key, or None
    for the newest)."""

    shard: str
    start: dict | None
    fetched: list[JobRow] = field(default_factory=list)
    last_evaluated: dict | None = None
    exhausted: bool = False
    consumed: int = 0

    @property
    def head(self) -> JobRow | None:
        return self.fetched[self.consumed] if self.consumed < len(self.fetched) else None


class JobIndex:
    """Reads `table_name` (the `<prefix>-jobs` table) through its status index."""

    def __init__(self, table_name: str, client):
        self.table_name = table_name
        self.client = client

    def get(self, job_id: str) -> JobRow | None:
        item = self.client.get_item(TableName=self.table_name, Key={"job_id": {"S": job_id}}).get("Item")
        return row_from_item(item) if item else None

    def page(
        self,
        page_size: int = 50,
        statuses: tuple[str, ...] = tuple(s.value for s in ALL_STATUSES),
        cursor: str | None = None,
        key_prefix: str = "",
        read_budget: int = SEARCH_READ_BUDGET,
    ) -> JobPage:
        """The next `page_size` jobs, newest first, of `statuses`, whose input key starts with `key_prefix`.

        A key-prefix search filters as it reads; once it has read `read_budget` items of a status without
        filling the page it returns what it found, and its cursor goes on from there.
        """
        shards = [shard for status in statuses for shard in status_shards(status)]
        starts = decode_cursor(cursor) if cursor else dict.fromkeys(shards)
        streams = [_Stream(shard, starts[shard]) for shard in shards if shard in starts]
        # One query per partition, at once: on AWS the page waits for one round trip, not one per partition.
        with ThreadPoolExecutor(max_workers=max(1, len(streams))) as pool:
            searched = sum(pool.map(lambda stream: self._fill(stream, page_size, key_prefix, read_budget), streams))
        rows = _merge(streams, page_size)
        next_starts = {}
        for stream in streams:
            all_consumed = stream.consumed == len(stream.fetched)
            if stream.exhausted and all_consumed:
                continue
            if all_consumed and stream.last_evaluated:
                next_starts[stream.shard] = stream.last_evaluated
            elif stream.consumed:
                next_starts[stream.shard] = stream.fetched[stream.consumed - 1].index_key
            else:
                next_starts[stream.shard] = stream.start
        cut_short = bool(key_prefix) and len(rows) < page_size and bool(next_starts)
        return JobPage(self._live(rows), encode_cursor(next_starts) if next_starts else None, searched, cut_short)

    def _live(self, rows: list[JobRow]) -> list[JobRow]:
        """The page's rows as the table holds them now: with their progress, which the index does not carry."""
        if not rows:
            return rows
        items = aws.batch_get(self.client, self.table_name, [{"job_id": {"S": row.job_id}} for row in rows])
        current = {item["job_id"]["S"]: row_from_item(item) for item in items}
        return [current.get(row.job_id, row) for row in rows]

    def since(self, moment: datetime) -> list[JobRow]:
        """Every job created at or after `moment`, of any status (the window of the timeline and cost pages)."""
        rows = []
        for shard in (shard for status in ALL_STATUSES for shard in status_shards(status)):
            for page in self.client.get_paginator("query").paginate(
                TableName=self.table_name,
                IndexName=STATUS_INDEX,
                KeyConditionExpression=f"{SHARD_ATTRIBUTE} = :s AND created_at >= :t",
                ExpressionAttributeValues={":s": {"S": shard}, ":t": {"S": isoformat(moment)}},
            ):
                rows.extend(row_from_item(item) for item in page.get("Items", []))
        return sorted(rows, key=lambda row: row.created_at)

    def _fill(self, stream: _Stream, page_size: int, key_prefix: str, read_budget: int) -> int:
        """Read `stream` until it holds one more row than a page, runs out, or spent the read budget."""
        evaluated = 0
        start = stream.start
        while True:
            request = {
                "TableName": self.table_name,
                "IndexName": STATUS_INDEX,
                "KeyConditionExpression": f"{SHARD_ATTRIBUTE} = :s",
                "ExpressionAttributeValues": {":s": {"S": stream.shard}},
                "ScanIndexForward": False,
                # A search reads its whole budget in one request (DynamoDB stops at 1 MB anyway).
                "Limit": page_size + 1 if not key_prefix else max(page_size + 1, read_budget - evaluated),
            }
            if key_prefix:
                request["FilterExpression"] = "begins_with(input_key, :p)"
                request["ExpressionAttributeValues"][":p"] = {"S": key_prefix}
            if start:
                request["ExclusiveStartKey"] = start
            response = self.client.query(**request)
            stream.fetched.extend(row_from_item(item) for item in response.get("Items", []))
            evaluated += response.get("ScannedCount", 0)
            start = response.get("LastEvaluatedKey")
            stream.last_evaluated = start
            if not start:
                stream.exhausted = True
                return evaluated
            if len(stream.fetched) > page_size or evaluated >= read_budget:
                return evaluated


def _merge(streams: list[_Stream], page_size: int) -> list[JobRow]:
    """Newest first across streams; stop before a row that an unread part of some stream might precede."""
    rows: list[JobRow] = []
    while len(rows) < page_size:
        live = [stream for stream in streams if stream.head is not None]
        if not live:
            break
        best = max(live, key=lambda stream: stream.head.created_at)
        head = best.head
        # A stream read up to its budget holds nothing newer than its last evaluated key: wait for it.
        if any(
            stream.head is None and not stream.exhausted and stream.last_evaluated
            and stream.last_evaluated["created_at"]["S"] > head.created_at
            for stream in streams
        ):
            break
        rows.append(head)
        best.consumed += 1
    return rows


def encode_cursor(starts: dict[str, dict | None]) -> str:
    compact = {
        shard: None if key is None else [key["job_id"]["S"], key["created_at"]["S"]] for shard, key in starts.items()
    }
    return base64.urlsafe_b64encode(json.dumps(compact, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, dict | None]:
    """The per-partition start keys of a cursor; ValueError for anything this module did not write."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("not a page cursor") from exc
    known = {shard for status in ALL_STATUSES for shard in status_shards(status)}
    if not isinstance(raw, dict) or not set(raw) <= known:
        raise ValueError("not a page cursor")
    starts: dict[str, dict | None] = {}
    for shard, key in raw.items():
        if key is None:
            starts[shard] = None
        elif isinstance(key, list) and len(key) == 2 and all(isinstance(part, str) for part in key):
            starts[shard] = {"job_id": {"S": key[0]}, SHARD_ATTRIBUTE: {"S": shard}, "created_at": {"S": key[1]}}
        else:
            raise ValueError("not a page cursor")
    return starts
