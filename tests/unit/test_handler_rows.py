"""The handler process's row collection and results.csv (worker/handler_host.py): rows of any shape keep
their cells under the right column, whatever the fast path for rows shaped like the columns does."""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

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
    assert error == "process() raised TypeError: process() must yield (item, row_dict) or (item, table) pairs, got str"
    assert [e.item for e in ctx.errors] == ["b.txt"]
    assert rows.rows == [("a.txt", {"ok": 1})]


# --- tables: many rows of one item at once (ctx.table, or a pandas DataFrame) ----------------------------


def run(handler, tmp_path, names, on_progress=None):
    items = [Item(name, tmp_path / "in" / name) for name in names]
    ctx = JobContext(tmp_path, logging.getLogger("t"), job_id="j", params={}, output_dir=tmp_path / "out")
    rows, error = run_process(handler, items, ctx, on_progress=on_progress)
    counts = finish_job(items, ctx, rows, tmp_path / "results.csv", tmp_path / "errors.jsonl")
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    return error, counts, (tmp_path / "results.csv").read_bytes(), errors


def test_a_table_is_one_row_per_position_with_dict_rows_beside_it(tmp_path):
    class Tables:
        def process(self, items, ctx):
            a, b, c, d = items
            yield a, {"label": 7}
            scores = np.array([0.5, 1 / 3, 2.0], np.float32)
            yield b, ctx.table({"row": range(1, 4), "label": np.array([1, 2, 3]), "score": scores,
                                "note": ['a,"quoted"', None, "line\nbreak"]}, decimals=3)
            scores[:] = 9  # a handler may reuse its arrays: the table yielded already keeps its values
            yield c, pd.DataFrame({"label": [4, 5], "flag": [True, False], "ratio": [0.1, 2.5]})
            yield d, ctx.table({"label": [6], "ratio": [0.25]})  # no decimals: floats as Python writes them

    names = ["a.png", "b, the \"odd\" one.npy", "c.csv", "d.npy"]
    error, counts, text, errors = run(Tables(), tmp_path, names)
    assert error is None and errors == []
    assert counts == {"total": 4, "succeeded": 4, "failed": 0, "rows": 1 + 3 + 2 + 1}
    assert list(csv.reader(io.StringIO(text.decode(), newline=""))) == [
        ["item", "label", "row", "score", "note", "flag", "ratio"],
        ["a.png", "7", "", "", "", "", ""],
        [names[1], "1", "1", "0.500", 'a,"quoted"', "", ""],
        [names[1], "2", "2", "0.333", "", "", ""],
        [names[1], "3", "3", "2.000", "line\nbreak", "", ""],
        ["c.csv", "4", "", "", "", "True", "0.1"],
        ["c.csv", "5", "", "", "", "False", "2.5"],
        ["d.npy", "6", "", "", "", "", "0.25"],
    ]


def test_a_bad_table_fails_only_its_item_and_says_why(tmp_path):
    class Bad:
        def process(self, items, ctx):
            for item, columns in zip(items, BAD_TABLES, strict=False):
                with ctx.item(item):
                    yield item, ctx.table(columns)
            yield items[-2], pd.DataFrame([[1, 2]], columns=["x", "x"])  # a DataFrame is checked by the runner
            yield items[-1], ctx.table({"x": np.arange(2)})

    names = [f"{n}.npy" for n in range(len(BAD_TABLES) + 2)]
    error, counts, text, errors = run(Bad(), tmp_path, names)
    assert error is None
    assert counts == {"total": len(names), "succeeded": 1, "failed": len(names) - 1, "rows": 2}
    messages = [(e["item"], e["type"], e["message"]) for e in errors]
    assert messages == [
        ("0.npy", "ValueError", "table columns differ in length (label=2, score=3): one value per row in every column"),
        ("1.npy", "ValueError", "table column name 'item' refused: the item column is the runner's"),
        ("2.npy", "ValueError", "table column name 1 refused: a column name is a non-empty str"),
        ("3.npy", "ValueError", "table column name '' refused: a column name is a non-empty str"),
        ("4.npy", "ValueError", "table column 'label' must be a sequence (a list or 1-D array: one value per row), not int"),
        ("5.npy", "ValueError", "table column 'label' must be a sequence (a list or 1-D array: one value per row), not str"),
        ("6.npy", "ValueError", "table column 'pixels' has 2 dimensions; a column is 1-D"),
        ("7.npy", "ValueError", "a table needs at least one column"),
        ("8.npy", "ValueError", "table column names repeat: ['x', 'x']"),
    ]
    assert text == b"item,x\r\n9.npy,0\r\n9.npy,1\r\n"


BAD_TABLES = [
    {"label": [1, 2], "score": [0.1, 0.2, 0.3]},
    {"item": ["x"]},
    {1: [1]},
    {"": [1]},
    {"label": 3},
    {"label": "123"},
    {"pixels": np.zeros((2, 2))},
    {},
]


def test_an_empty_table_is_no_row_and_progress_counts_items(tmp_path, monkeypatch):
    monkeypatch.setattr("worker.handler_host.PROGRESS_EVERY_SECONDS", 0.0)
    seen = []

    class Progress:
        def process(self, items, ctx):
            for n, item in enumerate(items):
                seen_before = len(seen)
                yield item, ctx.table({"n": np.arange(1000 * n)})
                assert len(seen) == seen_before + 1  # a table is counted as soon as it is yielded

    error, counts, text, errors = run(Progress(), tmp_path, ["a", "b", "c"], on_progress=lambda *p: seen.append(p))
    assert error is None
    assert seen == [(1, 3), (2, 3), (3, 3)]  # the empty table's item is done, and failed below
    assert counts == {"total": 3, "succeeded": 2, "failed": 1, "rows": 3000}
    assert [(e["item"], e["type"]) for e in errors] == [("a", "NoResult")]
    assert text.count(b"\r\n") == 3001


def test_digits_tables_write_the_same_results_as_dict_rows(tmp_path):
    """The digits package yields a table per .npy/.csv item; results.csv is byte for byte what the same
    predictions give as one dict per row (its form before tables): item first, six decimals."""
    package = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "digits"
    sys.path.insert(0, str(package))
    try:
        handler_module = importlib.import_module("handler")
    finally:
        sys.path.remove(str(package))
    digits = handler_module.Digits()
    digits.predict = lambda pixels: np.random.default_rng(len(pixels)).dirichlet(np.ones(10), len(pixels)).astype(np.float32)
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "x.npy", np.random.default_rng(1).integers(0, 17, (300, 8, 8)))
    (inputs / "y.csv").write_text("\n".join(",".join(["3"] * 64) for _ in range(4)) + "\n")
    shutil.copy(package.parents[2] / "samples" / "digit-3.png", inputs / "z.png")
    digits.model_input = handler_module.ModelInput(1, 8, 8, array_value_max=16.0, light_on_dark=True)

    kinds = []

    class AsDicts:
        def process(self, items, ctx):
            for item, row in digits.process(items, ctx):
                kinds.append(type(row).__name__)
                if isinstance(row, dict):
                    yield item, row
                    continue
                for values in zip(*(row.columns[c].tolist() if hasattr(row.columns[c], "tolist") else list(row.columns[c]) for c in row.columns), strict=True):
                    yield item, {c: f"{v:.6f}" if isinstance(v, float) else v for c, v in zip(row.columns, values, strict=True)}

    names = ["z.png", "x.npy", "y.csv"]
    tables = run(digits, tmp_path, names)
    (tmp_path / "results.csv").rename(tmp_path / "tables.csv")
    dicts = run(AsDicts(), tmp_path, names)
    assert tables[0] is None and tables[3] == []
    assert kinds == ["dict", "Table", "Table"]  # an image is a row, an array or CSV item a table
    assert tables[1] == dicts[1] == {"total": 3, "succeeded": 3, "failed": 0, "rows": 1 + 300 + 4}
    assert tables[2] == dicts[2]
    lines = tables[2].decode().split("\r\n")
    assert lines[0] == "item,label,confidence," + ",".join(f"prob_{k}" for k in range(10)) + ",row"
    assert re.fullmatch(r"x\.npy,\d,(0\.\d{6}),(0\.\d{6},){9}0\.\d{6},1", lines[2])
