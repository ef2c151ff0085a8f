"""Ways of starting a job on an instance: SSM Run Command (the default on AWS) or SSH (the local cloud)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchworker.errors import ConfigurationError

if TYPE_CHECKING:
    from batchworker.config import Settings
    from batchworker.control import Launcher


def make_launcher(settings: Settings, ssm_client: Any, **options: Any) -> Launcher:
    """The launcher `settings.transport` names; `options` (sleep, clock, poll_seconds) go to it."""
    if settings.transport == "ssm":
        from batchworker.transports.ssm import SsmLauncher

        return SsmLauncher(settings, ssm_client, **options)
    if settings.transport == "ssh":
        from batchworker.transports.ssh_launcher import SshLauncher  # paramiko only when SSH is used

        return SshLauncher(settings, ssm_client, **options)
    raise ConfigurationError(f"BATCHWORKER_TRANSPORT must be ssm or ssh, got {settings.transport!r}")
