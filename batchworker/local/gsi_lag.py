"""Eventually consistent GSIs for moto: a Query on a global secondary index answers from a view N seconds old.

On AWS a GSI is updated asynchronously: a write is usually visible in the index within a second, sometimes
later. moto updates it at once, which hides every decision taken on an index read that can miss a write.
Installed in the process that runs the moto server (the local cloud's supervisor) or around an in-process
`mock_aws` (tests). Base-table reads (GetItem, Query without an index, Scan) stay exact, as on AWS with
ConsistentRead.

How: every PutItem, UpdateItem and DeleteItem (TransactWriteItems and BatchWriteItem go through them) logs the
item as it was before the write; a GSI Query replays the log of the last `seconds` backwards over the table
to see it as it was then, and runs moto's own query on that view.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import GlobalSecondaryIndex, Table

_lock = threading.Lock()
_history: dict[str, collections.deque] = {}  # table name -> (monotonic time, key, item before the write)
_view = threading.local()  # .items: the lagged item list while a GSI query runs on this thread
_state = {"seconds": 0.0, "installed": False}
_originals: dict[str, Any] = {}


def set_lag(seconds: float) -> None:
    """Change the lag of an installed patch (0: GSIs are exact again)."""
    _state["seconds"] = max(float(seconds), 0.0)


def install(seconds: float) -> None:
    """Patch moto's DynamoDB in this process (idempotent); `seconds` old views from now on."""
    set_lag(seconds)
    if _state["installed"]:
        return
    _originals.update(
        put_item=DynamoDBBackend.put_item, update_item=DynamoDBBackend.update_item,
        delete_item=DynamoDBBackend.delete_item, query=Table.query, all_items=Table.all_items,
    )
    DynamoDBBackend.put_item = _logged("put_item", lambda args, kwargs: args[1] if len(args) > 1 else kwargs["item_attrs"])
    DynamoDBBackend.update_item = _logged("update_item", lambda args, kwargs: args[1] if len(args) > 1 else kwargs["key"])
    DynamoDBBackend.delete_item = _logged("delete_item", lambda args, kwargs: args[1] if len(args) > 1 else kwargs["key"])
    Table.query = _lagged_query
    Table.all_items = _all_items
    _state["installed"] = True


def uninstall() -> None:
    if not _state["installed"]:
        return
    DynamoDBBackend.put_item = _originals["put_item"]
    DynamoDBBackend.update_item = _originals["update_item"]
    DynamoDBBackend.delete_item = _originals["delete_item"]
    Table.query = _originals["query"]
    Table.all_items = _originals["all_items"]
    with _lock:
        _history.clear()
    _state.update(installed=False, seconds=0.0)


@contextlib.contextmanager
def lagging_indexes(seconds: float) -> Iterator[None]:
    """GSI queries lag `seconds` behind writes inside the block (in-process moto, for tests)."""
    install(seconds)
    try:
        yield
    finally:
        uninstall()


def _key_of(table: Table, attrs: dict) -> tuple:
    hash_value = DynamoType(attrs[table.hash_key_attr])
    range_value = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
    return hash_value, range_value


def _logged(name: str, key_attrs):
    original = _originals[name]

    def write(self, table_name, *args, **kwargs):
        if _state["seconds"] <= 0:
            return original(self, table_name, *args, **kwargs)
        table = self.get_table(table_name)
        key = _key_of(table, key_attrs((self, *args), kwargs))
        with _lock:  # the before-image and the write together: no other write between them
            before = copy.deepcopy(table.get_item(*key) if table.range_key_attr else table.get_item(key[0]))
            result = original(self, table_name, *args, **kwargs)
            now = time.monotonic()
            log = _history.setdefault(table_name, collections.deque())
            log.append((now, key, before))
            while log and log[0][0] < now - _state["seconds"] - 5:
                log.popleft()
        return result

    write.__name__ = name
    return write


def _all_items(self):
    items = getattr(_view, "items", None)
    return items if items is not None else _originals["all_items"](self)


def _lagged_query(self, *args, **kwargs):
    original = _originals["query"]
    seconds = _state["seconds"]
    index_name = inspect.signature(original).bind(self, *args, **kwargs).arguments.get("index_name")
    index = {i.name: i for i in self.all_indexes()}.get(index_name) if index_name else None
    if seconds <= 0 or not isinstance(index, GlobalSecondaryIndex):
        return original(self, *args, **kwargs)
    with _lock:
        current = {(item.hash_key, item.range_key if self.range_key_attr else None): item
                   for item in _originals["all_items"](self)}
        horizon = time.monotonic() - seconds
        for moment, key, before in reversed(_history.get(self.name, ())):
            if moment <= horizon:
                break
            if before is None:
                current.pop(key, None)  # the item did not exist yet
            else:
                current[key] = before
        items = sorted(current.values(), key=lambda x: (x.hash_key, x.range_key) if x.range_key else x.hash_key)
    _view.items = items
    try:
        return original(self, *args, **kwargs)
    finally:
        _view.items = None
