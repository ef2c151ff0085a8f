"""JSON-lines logging for the job: one object per event, to stderr and to the job's job.log."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

LOGGER_NAME = "worker"
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonLinesFormatter(logging.Formatter):
    """`{"at", "level", "event", ...extra fields}`; fields come from `logger.info(..., extra={...})`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "event": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRS and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _JobIdFilter(logging.Filter):
    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):  # the batch's lease heartbeat names the job it is about
            record.job_id = self.job_id
        return True


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


@contextlib.contextmanager
def job_logging(job_id: str, log_path: Path) -> Iterator[logging.Logger]:
    """Route the job's events to stderr and to log_path for the duration of one job."""
    logger = get_logger()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = JsonLinesFormatter()
    job_filter = _JobIdFilter(job_id)
    handlers: list[logging.Handler] = [
        logging.FileHandler(log_path, mode="w", encoding="utf-8"),  # a relaunched job starts a fresh log
        logging.StreamHandler(sys.stderr),
    ]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(job_filter)
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def flush_handlers() -> None:
    for handler in get_logger().handlers:
        handler.flush()
