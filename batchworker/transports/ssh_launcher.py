"""Starts a job on an instance over SSH: pinned host key, fixed command, the job spec as stdin data."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.config import Settings
from batchworker.errors import DispatchError, InstanceReadyTimeout, LaunchInterrupted
from batchworker.transports.ssh import (
    HostKeyMismatch,
    TransportError,
    fetch_endpoint,
    load_private_key,
    probe,
    run_with_stdin,
)

logger = logging.getLogger(__name__)
MAX_POLL_SECONDS = 4.0


class SshLauncher:
    """`launch()` waits until the instance's published SSH endpoint answers, then runs `job_command`.

    The command line is the fixed `settings.job_command`; the object key travels only inside the JSON
    written to the command's stdin, so no key ever becomes shell text.
    """

    max_spec_bytes = 1024 * 1024  # what `batchworker-job launch` reads from stdin for a batch

    def __init__(
        self,
        settings: Settings,
        ssm_client,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 0.5,
        probe_seconds: float = 0.05,
    ):
        self.settings = settings
        self.ssm = ssm_client
        self.sleep = sleep
        self.clock = clock
        self.poll_seconds = poll_seconds  # first wait between endpoint reads (SSM), then growing
        # A known endpoint is probed often: its SSH answering is the moment a cold start waits for (a TCP
        # connect and a banner, no AWS call; every 0.05 s: a cold start waits 0.025 s for it on average).
        self.probe_seconds = probe_seconds
        self._pkey = None

    def launch(self, instance_id: str, spec: dict, deadline: float) -> dict:
        if self._pkey is None:
            try:
                self._pkey = load_private_key(self.ssm, self.settings.ssh_private_key_parameter)
            except TransportError as exc:
                raise DispatchError(f"cannot load the SSH login key: {exc}") from exc
        payload = json.dumps(spec).encode()
        last_problem = "no SSH endpoint published yet"
        read_every, next_read = self.poll_seconds, self.clock()
        endpoint = None
        while True:
            if self.clock() >= next_read:
                try:
                    endpoint = fetch_endpoint(self.ssm, self.settings.parameter_prefix, instance_id)
                except ClientError as exc:
                    if not aws.is_throttling(exc):
                        raise
                    endpoint, last_problem = None, f"SSM parameter reads throttled ({aws.error_code(exc)})"
                # Reads grow apart, jittered: many dispatchers waiting on booting instances stay well under
                # SSM's limits. The probe below (a TCP connect, no AWS call) stays frequent.
                next_read = self.clock() + random.uniform(read_every / 2, read_every)
                read_every = min(read_every * 2, MAX_POLL_SECONDS)
            if endpoint is not None and probe(endpoint, timeout=2.0):
                try:
                    result = run_with_stdin(
                        endpoint,
                        self.settings.ssh_user,
                        self._pkey,
                        self.settings.job_command,
                        payload,
                        timeout_seconds=self.settings.dispatch_command_timeout_seconds,
                    )
                except HostKeyMismatch as exc:
                    raise DispatchError(
                        f"instance {instance_id} presented a host key other than the one it published; "
                        "refusing to connect (no command was run)"
                    ) from exc
                except TransportError as exc:
                    if not exc.retryable:
                        raise DispatchError(f"could not start the job on instance {instance_id}: {exc}") from exc
                    last_problem = f"SSH not ready: {exc}"
                else:
                    if result.exit_status == -1:  # no exit status: killed, or the connection dropped
                        raise LaunchInterrupted(
                            f"the job launcher on instance {instance_id} was cut off before it answered"
                        )
                    if result.exit_status != 0:
                        raise DispatchError(
                            f"job launcher on instance {instance_id} exited {result.exit_status}: "
                            f"{result.stderr.decode(errors='replace')[-500:]}"
                        )
                    return _parse_launch_reply(result.stdout)
            elif endpoint is not None:
                last_problem = f"SSH endpoint {endpoint.host}:{endpoint.port} does not answer yet"
            if self.clock() >= deadline:
                raise InstanceReadyTimeout(
                    f"instance {instance_id} was not reachable over SSH within "
                    f"{self.settings.instance_ready_timeout_seconds:.0f}s ({last_problem})"
                )
            self.sleep(self.probe_seconds)


def _parse_launch_reply(stdout: bytes) -> dict:
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        if isinstance(reply, dict):
            return reply
    return {}
