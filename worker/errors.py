"""Errors the job reports, and the exit codes that tell the caller whether to retry."""

from __future__ import annotations

import enum
import json
import sys


class ExitCode(enum.IntEnum):
    """Exit codes of `batchworker-job run` (docs/architecture.md)."""

    SUCCEEDED = 0
    FAILED = 2  # permanent: bad spec, bad input, a broken package; retrying will not help
    TRANSIENT = 75  # EX_TEMPFAIL: S3 or network trouble; the same job may succeed later


class JobError(Exception):
    """Base class. The message goes into the manifest as is: say what is wrong and what to do."""

    transient = False

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.TRANSIENT if self.transient else ExitCode.FAILED


class SpecError(JobError):
    """The job spec is malformed."""


class InputError(JobError):
    """The input file cannot be used (unknown type, corrupt, empty, wrong shape, over a limit)."""


class Interrupted(JobError):
    """The job got SIGTERM (instance stopping, operator); the same job may succeed when resubmitted."""

    transient = True


class StorageError(JobError):
    """S3 trouble. Missing objects and denied access are permanent; everything else is transient."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def printable(text: str, limit: int = 200) -> str:
    """User-supplied text (keys, entry names) made safe for one-line messages: no control chars, bounded."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def print_error(message: str) -> None:
    """A diagnostic of `batchworker-job`: one JSON line on stderr (stdout carries the results)."""
    print(json.dumps({"error": message}), file=sys.stderr, flush=True)
