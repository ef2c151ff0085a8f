"""Errors of job packages; each message names what is wrong and what to change."""

from batchworker.errors import PermanentError


class JobPackageError(PermanentError):
    """Base class of every job-package error."""


class InvalidJobConfig(JobPackageError):
    """job.toml (or the package around it) breaks the schema; the message names the field and the fix."""


class InvalidParams(JobPackageError):
    """Parameters of one upload do not fit the package's [params]; the message names the parameter."""


class UnsafeArchive(JobPackageError):
    """A package archive that must not be unpacked (links, paths outside, too big) or does not match its hash."""


class PackageNotFound(JobPackageError):
    """No package of that name (or no such version) is deployed."""


class DeployConflict(JobPackageError):
    """Another deploy or rollback of the same package changed it at the same moment; nothing was changed."""
