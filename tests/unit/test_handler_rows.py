"""The handler process's row collection and results.csv (worker/handler_host.py): rows of any shape keep
their cells under the right column, whatever the fast path for rows shaped like the columns does."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from worker.handler_context import Item, JobContext
from worker.handler_host import finish_job, run_process


class Mixed:
    def process(self, items, ctx):
        a, b, c = items
        reused = {"label": 1, "score": 0.5}
        yield a, reused
        reused["label"] = 2  # a handler may reuse its dict: the row already yielded must not change
        yield a, reused
        yield b, {"score": None, "label": 3, "extra": "x"}  # other order, a None, a new column
        yield c, {1: "int key", "item": "ignored: the item column is the runner's"}


def test_rows_of_every_shape_land_in_their_columns(tmp_path):
    items = [Item(name, tmp_path / name) for name in ("a.txt", "b.txt", "c.txt")]
    ctx = JobContext(tmp_path, logging.getLogger("t"), job_id="j", params={}, output_dir=tmp_path / "out")
    rows, error = run_process(Mixed(), items, ctx, on_progress=lambda done, total: None)
    counts = finish_job(items, ctx, rows, tmp_path / "results.csv", tmp_path / "errors.jsonl")
    assert error is None
    assert counts == {"total": 3, "succeeded": 3, "failed": 0, "rows": 4}
    with (tmp_path / "results.csv").open(newline="") as fh:
        table = list(csv.reader(fh))
    assert table == [
        ["item", "label", "score", "extra", "1"],
        ["a.txt", "1", "0.5", "", ""],
        ["a.txt", "2", "0.5", "", ""],
        ["b.txt", "3", "", "x", ""],
        ["c.txt", "", "", "", "int key"],
    ]
    assert Path(tmp_path / "errors.jsonl").read_text() == ""


def test_a_row_that_is_not_a_pair_fails_the_items_without_rows(tmp_path):
    class Broken:
        def process(self, items, ctx):
            yield items[0], {"ok": 1}
            yield "not a pair"

    items = [Item("a.txt", tmp_path / "a"), Item("b.txt", tmp_path / "b")]
    ctx = JobContext(tmp_path, logging.getLogger("t"), job_id="j", params={}, output_dir=tmp_path / "out")
    rows, error = run_process(Broken(), items, ctx)
    assert error == "process() raised TypeError: process() must yield (item, row_dict) pairs, got str"
    assert [e.item for e in ctx.errors] == ["b.txt"]
    assert rows.rows == [("a.txt", {"ok": 1})]
