"""The one error hierarchy of batchworker; every module raises a subclass of BatchworkerError."""


class BatchworkerError(Exception):
    """Base class of every error batchworker raises on purpose."""


class ConfigurationError(BatchworkerError):
    """A setting is missing or invalid; the message names it."""


class RetryableError(BatchworkerError):
    """A transient failure: trying again later may succeed."""


class PermanentError(BatchworkerError):
    """Trying again cannot help: bad input, a missing object, a refused request."""


class LaunchInterrupted(RetryableError):
    """The launch command was cut off before it answered (the instance stopped under it)."""


class InsufficientCapacity(RetryableError):
    """EC2 has no capacity for the instance type in the instance's Availability Zone right now."""

    def __init__(self, message: str, instance_ids: tuple[str, ...] = (), availability_zones: tuple[str, ...] = ()):
        super().__init__(message)
        self.instance_ids = instance_ids
        self.availability_zones = availability_zones


class InstanceReadyTimeout(PermanentError):
    """The instance did not become ready within the bounded wait."""


class NoInstanceAvailable(RetryableError):
    """No tagged instance exists or none can take the job now."""


class RejectedEvent(PermanentError):
    """An event that must not produce a job (wrong bucket, malformed record)."""


class DispatchError(PermanentError):
    """The job could not be started on the instance."""


class UsageError(BatchworkerError):
    """The command line names something ambiguous or missing; the message says what to give instead."""
