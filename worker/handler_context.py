"""What a job package's handler is handed: items, and the contexts of setup() and process().

Runs inside the package's environment (worker/handler_host.py) and needs only the standard library. A
handler never imports this module: a test may hand it any object with the same attributes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import posixpath
import shutil
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_TRACEBACK_CHARS = 4000
MAX_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class Item:
    """One input item: a file on local disk. `name` is for people (and results.csv), `path` for reading."""

    name: str
    path: Path


class OutputRefused(ValueError):
    """write_output() was asked to write outside the job's output folder."""


def _detect_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu" (also when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class SetupContext:
    """setup(ctx): once per process. package_dir holds the package's files (weights, config)."""

    def __init__(self, package_dir: Path, log: logging.Logger) -> None:
        self.package_dir = Path(package_dir)
        self.log = log
        self._device: str | None = None

    @property
    def device(self) -> str:
        """"cuda" or "cpu"; torch accepts it as is (tensor.to(ctx.device)). Imports torch on first use."""
        if self._device is None:
            self._device = _detect_device()
        return self._device


@dataclass
class ItemError:
    item: str
    type: str
    message: str
    traceback: str

    def to_json(self) -> dict[str, str]:
        return {"item": self.item, "type": self.type, "message": self.message, "traceback": self.traceback}


def describe_exception(item_name: str, exc: BaseException) -> ItemError:
    """The error record of one failed item: type, message and the tail of the traceback."""
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-MAX_TRACEBACK_CHARS:]
    message = str(exc)[:MAX_MESSAGE_CHARS] or type(exc).__name__
    return ItemError(item_name, type(exc).__name__, message, tail)


class JobContext(SetupContext):
    """process(items, ctx): once per job. params are typed, defaults applied."""

    def __init__(
        self,
        package_dir: Path,
        log: logging.Logger,
        *,
        job_id: str,
        params: dict[str, Any],
        output_dir: Path,
        device: str | None = None,
        on_item_error: Callable[[ItemError], None] | None = None,
    ) -> None:
        super().__init__(package_dir, log)
        self._device = device
        self.job_id = job_id
        self.params = dict(params)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.errors: list[ItemError] = []
        self._on_item_error = on_item_error

    def write_output(self, relative_name: str, data: bytes | bytearray | memoryview | str | os.PathLike) -> Path:
        """Write outputs/<relative_name>: bytes as they are, a str as UTF-8 text, a pathlib.Path's file copied.
        Returns the written path.

        The name must stay inside the job's output folder: no absolute path, no '..'; else OutputRefused.
        """
        target = self._output_path(relative_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        if isinstance(data, (bytes, bytearray, memoryview)):
            tmp.write_bytes(bytes(data))
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, os.PathLike):
            shutil.copyfile(data, tmp)
        else:
            raise TypeError(f"write_output takes bytes, str or a pathlib.Path, not {type(data).__name__}")
        os.replace(tmp, target)
        return target

    def _output_path(self, relative_name: str) -> Path:
        refused = OutputRefused(
            f"write_output refused {relative_name!r:.200}: it is outside the job's output folder; "
            "use a relative name such as 'masks/a.png' (no leading '/', no '..')"
        )
        if not isinstance(relative_name, str) or not relative_name or "\0" in relative_name:
            raise refused
        name = relative_name.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
            raise refused
        clean = posixpath.normpath(name)
        if clean in (".", "") or clean.startswith("../"):
            raise refused
        root = os.path.realpath(self.output_dir)
        target = os.path.realpath(os.path.join(root, clean))
        if os.path.commonpath([root, target]) != root or target == root:
            raise refused  # a symlink inside the folder pointing out of it
        return Path(target)

    def table(self, columns: Mapping[str, Any] | Any, *, decimals: int | None = None) -> Table:
        """Many results rows of one item at once: `yield item, ctx.table({"row": numbers, "score": scores})`.
        columns: a dict of equal-length columns (lists, tuples, 1-D NumPy arrays, pandas Series) or a pandas
        DataFrame; decimals: digits after the point for every float (None: as Python writes them).
        A bad table (lengths differ, a name that is not a str or is "item") raises ValueError here."""
        return Table(columns, decimals)

    @contextlib.contextmanager
    def item(self, item: Item | Any) -> Iterator[None]:
        """`with ctx.item(item):` an exception inside fails this item only (recorded in errors.jsonl)."""
        try:
            yield
        except Exception as exc:
            self.fail_item(getattr(item, "name", str(item)), exc)

    def fail_item(self, item_name: str, exc: BaseException) -> None:
        error = describe_exception(item_name, exc)
        self.errors.append(error)
        if self._on_item_error is not None:
            self._on_item_error(error)


class Table:
    """The results rows of one item as columns: `yield item, ctx.table({"label": labels, ...})`, one row per
    position. Kept as the handler gave them (a copy) while process() runs; formatted only when results.csv is
    written, so a 100,000-row array item does not build 100,000 dicts in process()."""

    def __init__(self, columns: Mapping[str, Any], decimals: int | None = None) -> None:
        if not isinstance(columns, Mapping):
            columns = _frame_columns(columns)
        if decimals is not None and (type(decimals) is not int or not 0 <= decimals <= MAX_DECIMALS):
            raise ValueError(f"table decimals must be an int from 0 to {MAX_DECIMALS} or None, not {decimals!r:.50}")
        if not columns:
            raise ValueError("a table needs at least one column")
        self.decimals = decimals
        self.columns: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for name, column in columns.items():
            if type(name) is not str or not name or name == "item":
                reason = "the item column is the runner's" if name == "item" else "a column name is a non-empty str"
                raise ValueError(f"table column name {name!r:.100} refused: {reason}")
            self.columns[name] = _column_copy(name, column)
            lengths[name] = len(self.columns[name])
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name}={length}" for name, length in list(lengths.items())[:12])
            raise ValueError(f"table columns differ in length ({shown}): one value per row in every column")
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def cells(self, name: str) -> list:
        """One column as csv.writer cells: Python values (NumPy's converted), floats with `decimals` digits
        when given (one % over the whole column, not one per value), None an empty cell."""
        column = self.columns[name]
        values = _values(column)
        if self.decimals is None or not values:
            return values
        fmt = f"%.{self.decimals}f"
        dtype = getattr(column, "dtype", None)
        if getattr(dtype, "kind", "") == "f" or all(type(v) is float for v in values):
            with contextlib.suppress(TypeError):  # a missing value (pandas' NA) in a float column: one by one
                return ("\n".join([fmt] * len(values)) % tuple(values)).split("\n")
        return [fmt % v if isinstance(v, float) else v for v in values]

    def csv_lines(self, item_cell: str, names: list[str]) -> str | None:
        """This table's lines of results.csv by one % over all its values, when every column holds numbers
        (NumPy int/float/bool columns, ranges, lists of one number type): `item_cell` is the item's cell
        as csv.writer quotes it, `names` the file's columns after `item` (one this table lacks is empty).
        None when a column holds anything else: cells() and csv.writer then write it."""
        formats, columns = [], []
        for name in names:
            column = self.columns.get(name)
            if column is None:
                formats.append("")
                continue
            values = _values(column)
            fmt = _number_format(values, getattr(getattr(column, "dtype", None), "kind", ""), self.decimals)
            if fmt is None:
                return None
            formats.append(fmt)
            columns.append(values)
        line = item_cell.replace("%", "%%") + "," + ",".join(formats) + "\r\n"
        try:
            return (line * self.length) % tuple(itertools.chain.from_iterable(zip(*columns, strict=True)))
        except TypeError:  # a missing value (pandas' NA) in a number column
            return None


MAX_DECIMALS = 17


def _values(column: Any) -> list:
    """A column's values as Python objects (NumPy and pandas convert theirs in one call)."""
    return column.tolist() if hasattr(column, "tolist") else list(column)


def _number_format(values: list, kind: str, decimals: int | None) -> str | None:
    """The % format csv.writer's text of these numbers has: ints as str(), bools True/False, floats repr()
    or with `decimals` digits; None for a column that is not all numbers of one type."""
    if kind not in ("i", "u", "f", "b"):
        types = set(map(type, values))
        kind = {frozenset([int]): "i", frozenset([float]): "f", frozenset([bool]): "b"}.get(frozenset(types), "")
    if kind == "f":
        return "%r" if decimals is None else f"%.{decimals}f"
    return {"i": "%d", "u": "%d", "b": "%s"}.get(kind)


def _column_copy(name: str, column: Any) -> Any:
    """A copy of one column (the handler may reuse its arrays for the next item); a sequence, not a scalar."""
    if isinstance(column, (str, bytes, bytearray)) or not hasattr(column, "__len__"):
        raise ValueError(f"table column {name!r:.100} must be a sequence (a list or 1-D array: one value per "
                         f"row), not {type(column).__name__}")
    if getattr(column, "ndim", 1) != 1:
        raise ValueError(f"table column {name!r:.100} has {column.ndim} dimensions; a column is 1-D")
    if isinstance(column, (tuple, range)):
        return column
    copy = getattr(column, "copy", None)  # NumPy arrays, pandas Series, lists
    return copy() if callable(copy) else list(column)


def _frame_columns(frame: Any) -> dict[Any, Any]:
    """A pandas DataFrame's columns (without importing pandas); anything else is refused."""
    names = getattr(frame, "columns", None)
    if names is None or not hasattr(frame, "iloc"):
        raise TypeError(f"a table is a dict of columns or a pandas DataFrame, not a {type(frame).__name__}")
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"table column names repeat: {names!r:.200}")
    return {name: frame[name] for name in names}


@dataclass
class RowCollector:
    """What process() yields, per item, in order: (name, dict) rows and (name, Table) tables; columns are
    the union of row keys and table columns, `item` first."""

    rows: list[tuple[str, dict[str, Any] | Table]] = field(default_factory=list)

    def add(self, item_name: str, row: dict[str, Any]) -> None:
        self.rows.append((item_name, dict(row)))

    def count(self) -> int:
        """results.csv's rows: a dict is one, a table its length."""
        return sum(len(row) if type(row) is Table else 1 for _, row in self.rows)

    def names(self) -> set[str]:
        """The items with at least one row."""
        return {name for name, row in self.rows if type(row) is not Table or len(row)}

    def columns(self) -> list[str]:
        seen: dict[str, None] = {"item": None}
        shapes: set[tuple] = set()  # rows of one handler mostly share their keys: look at each set once
        for _, row in self.rows:
            keys = tuple(row.columns if type(row) is Table else row)
            if keys not in shapes:
                shapes.add(keys)
                for key in keys:
                    seen.setdefault(str(key), None)
        return list(seen)
