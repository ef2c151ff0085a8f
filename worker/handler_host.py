"""The process that hosts one job package's handler: setup() once, then process() once per job.

Started by worker/hosts.py with the package environment's Python (`python -m worker.handler_host`), it
speaks JSON lines: jobs in on stdin, events out on the original stdout (ready | setup_failed, log,
process_started, progress (at most every PROGRESS_EVERY_SECONDS), done). The handler's own prints go to stderr, so they cannot corrupt the protocol. Standard
library only: the package environment may lack everything else.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from worker.handler_context import (
    Item,
    ItemError,
    JobContext,
    RowCollector,
    SetupContext,
    Table,
    describe_exception,
)

PROGRESS_EVERY_SECONDS = 0.5
PROGRESS_CHECK_ROWS = 64  # rows between two looks at the clock
PARENT_CHECK_SECONDS = 1.0


def _exit_with_parent() -> None:
    """The runner may be killed (SIGKILL at the job's runtime cap): its handler process must not run on."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Channel:
    """The protocol's output: one JSON object per line, from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str, ensure_ascii=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _ChannelHandler(logging.Handler):
    """ctx.log records travel to the runner, which writes them into the job's job.log."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)[-2000:]
            self._channel.send("log", level=record.levelname, message=message[:4000])
        except Exception:  # a log line must never fail the job
            pass


def load_handler(package_dir: Path, entrypoint: str) -> Any:
    """Import module:Class from the package folder and instantiate it."""
    module_name, _, class_name = entrypoint.partition(":")
    if str(package_dir) not in sys.path:
        sys.path.insert(0, str(package_dir))
    module = importlib.import_module(module_name)
    handler_class = getattr(module, class_name, None)
    if handler_class is None:
        raise AttributeError(f"module {module_name!r} has no class {class_name!r} (entrypoint {entrypoint!r})")
    return handler_class()


def run_process(handler: Any, items: list[Item], ctx: JobContext, on_progress=None) -> tuple[RowCollector, str | None]:
    """Drive handler.process(items, ctx) to the end: the rows, and an error message if process() itself
    raised (its item errors are in ctx.errors). This loop is the hot path of a job with many rows yielded
    one by one: a few cheap checks per yield, the clock read every PROGRESS_CHECK_ROWS yields and after each
    table. A table (ctx.table, or a pandas DataFrame) is kept as it is: results.csv formats it later."""
    rows = RowCollector()
    add = rows.rows.append
    done: set[str] = set()
    names = {item.name for item in items}
    process_error: str | None = None
    last_sent = time.monotonic()
    count = 0
    try:
        produced = handler.process(items, ctx)
        for pair in produced if produced is not None else ():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"process() must yield (item, row_dict) or (item, table) pairs, got {type(pair).__name__}")
            item, row = pair
            name = item.name if type(item) is Item else getattr(item, "name", item)
            if type(name) is not str:
                raise TypeError(f"process() yielded an item of type {type(item).__name__}; yield the Item")
            count += 1
            if type(row) is dict or isinstance(row, Mapping):
                add((name, dict(row)))  # a copy: a handler may reuse its dict for the next row
            elif type(row) is Table or hasattr(row, "columns"):
                try:
                    table = row if type(row) is Table else Table(row)  # a pandas DataFrame
                except (TypeError, ValueError) as exc:
                    ctx.fail_item(name, exc)  # a bad table fails its item, as a bad item does
                    continue
                add((name, table))
                count = 0  # a table can be long: look at the clock now
            else:
                raise TypeError(f"process() must yield (item, row_dict) or (item, table) pairs, got a "
                                f"{type(row).__name__} row")
            done.add(name)
            if on_progress is not None and not count % PROGRESS_CHECK_ROWS:
                now = time.monotonic()
                if now - last_sent >= PROGRESS_EVERY_SECONDS:
                    last_sent = now
                    on_progress(len((done | {e.item for e in ctx.errors}) & names), len(items))
    except Exception as exc:
        error = describe_exception("", exc)
        process_error = f"process() raised {error.type}: {error.message}"
        failed = {e.item for e in ctx.errors}
        for item in items:
            if item.name not in done and item.name not in failed:
                ctx.fail_item(item.name, exc)
    return rows, process_error


def finish_job(items: list[Item], ctx: JobContext, rows: RowCollector, results_path: Path,
               errors_path: Path) -> dict[str, int]:
    """Write results.csv and errors.jsonl; the item counts. An item succeeded when it has a row and no
    error; an item with neither gets a "NoResult" error."""
    failed_names = {error.item for error in ctx.errors}
    with_rows = rows.names()
    for item in items:
        if item.name not in with_rows and item.name not in failed_names:
            ctx.errors.append(ItemError(item.name, "NoResult", "process() yielded no row for this item", ""))
            failed_names.add(item.name)
    write_results(rows, results_path)
    with errors_path.open("w", encoding="utf-8") as fh:
        for error in ctx.errors:
            fh.write(json.dumps(error.to_json(), ensure_ascii=False) + "\n")
    failed = len({item.name for item in items} & failed_names)
    return {"total": len(items), "succeeded": len(items) - failed, "failed": failed, "rows": rows.count()}


def write_results(rows: RowCollector, path: Path) -> None:
    """results.csv: `item`, then the union of the rows' keys and tables' columns in order of appearance; a
    missing value (or None) is an empty cell. A row whose keys come in the columns' own order (the usual
    case: every row of a handler has the same keys) is written as it is, without a lookup per cell; a table
    column by column (Table.cells), its rows by zip."""
    columns = rows.columns()
    tail = tuple(columns[1:])

    def line(name: str, row: dict) -> list:
        if tuple(row) == tail:
            return [name, *row.values()]
        values = {str(key): value for key, value in row.items()}
        values["item"] = name
        return [values.get(column) for column in columns]

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for tables, group in itertools.groupby(rows.rows, key=lambda entry: type(entry[1]) is Table):
            if not tables:
                writer.writerows(line(name, row) for name, row in group)
                continue
            for name, table in group:
                text = table.csv_lines(_csv_cell(name), list(tail))
                if text is not None:
                    fh.write(text)
                    continue
                cells = [table.cells(c) if c in table.columns else itertools.repeat(None) for c in tail]
                writer.writerows(zip(itertools.repeat(name, len(table)), *cells, strict=False))  # a missing column repeats None


def _csv_cell(value: str) -> str:
    """One cell as csv.writer writes it in a row of several (quoted when it holds , " or a line break)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow([value, ""])
    return buffer.getvalue()[: -len(",\r\n")]


def serve(package_dir: Path, entrypoint: str, stdin: TextIO, channel: _Channel) -> int:
    logger = logging.getLogger("job")
    logger.handlers[:] = [_ChannelHandler(channel)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    os.chdir(package_dir)
    started = time.monotonic()
    setup_ctx = SetupContext(package_dir, logger)
    try:
        handler = load_handler(package_dir, entrypoint)
        setup = getattr(handler, "setup", None)
        if setup is not None:
            setup(setup_ctx)
    except BaseException as exc:  # SystemExit in a handler is its failure too
        error = describe_exception("", exc)
        channel.send("setup_failed", type=error.type, message=error.message, traceback=error.traceback)
        return 3
    device = setup_ctx._device or ("cuda" if _torch_sees_cuda() else "cpu")
    channel.send("ready", setup_s=round(time.monotonic() - started, 3), device=device, pid=os.getpid())
    for line in stdin:
        request = json.loads(line)
        job = request["job"]
        items = [Item(entry["name"], Path(entry["path"])) for entry in job["items"]]
        ctx = JobContext(package_dir, logger, job_id=job["job_id"], params=job["params"],
                         output_dir=Path(job["output_dir"]), device=setup_ctx._device)
        channel.send("process_started", at=time.time())
        started = time.monotonic()
        rows, process_error = run_process(
            handler, items, ctx, lambda done, total: channel.send("progress", done=done, total=total)
        )
        process_s = time.monotonic() - started
        counts = finish_job(items, ctx, rows, Path(job["results_path"]), Path(job["errors_path"]))
        results_s = time.monotonic() - started - process_s
        first = ctx.errors[0].to_json() if ctx.errors else None
        channel.send("done", counts=counts, process_error=process_error, first_error=first,
                     process_s=round(process_s, 4), results_s=round(results_s, 4))
    return 0


def _torch_sees_cuda() -> bool:
    torch = sys.modules.get("torch")  # never imported here just to ask
    return bool(torch is not None and torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.handler_host")
    parser.add_argument("--package-dir", type=Path, required=True)
    parser.add_argument("--entrypoint", required=True)
    args = parser.parse_args(argv)
    _exit_with_parent()
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the handler's print() goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    return serve(args.package_dir.resolve(), args.entrypoint, sys.stdin, _Channel(protocol))


if __name__ == "__main__":
    sys.exit(main())
