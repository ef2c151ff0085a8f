"""What a job package's handler is handed: items, and the contexts of setup() and process().

Runs inside the package's environment (worker/handler_host.py) and needs only the standard library. A
handler never imports this module: a test may hand it any object with the same attributes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
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


@dataclass
class RowCollector:
    """The rows process() yields, per item, in order; columns are the union of row keys, `item` first."""

    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add(self, item_name: str, row: dict[str, Any]) -> None:
        self.rows.append((item_name, dict(row)))

    def columns(self) -> list[str]:
        seen: dict[str, None] = {"item": None}
        shapes: set[tuple] = set()  # rows of one handler mostly share their keys: look at each set once
        for _, row in self.rows:
            keys = tuple(row)
            if keys not in shapes:
                shapes.add(keys)
                for key in keys:
                    seen.setdefault(str(key), None)
        return list(seen)


def stderr_logger(name: str = "job") -> logging.Logger:
    """A logger for running a handler by hand (a plain shell, or a test)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.setLevel(logging.INFO)
    return logger
