"""SSH transport: how the worker Lambda reaches a GPU instance and runs one fixed command on it.

The instance's host key is pinned from its SSM endpoint parameter; unknown or changed keys are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

import paramiko
from botocore.exceptions import ClientError

from batchworker.errors import BatchworkerError

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_LIMIT_BYTES = 64 * 1024
_CHUNK_BYTES = 32 * 1024
_POLL_SECONDS = 0.05
_SUPPORTED_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)


class TransportError(BatchworkerError):
    """Base of the SSH transport errors; `retryable` says whether trying again later can help."""

    retryable = False


class InvalidEndpoint(TransportError):
    """The ssh-endpoint parameter is not the JSON the instance should publish."""


class PrivateKeyError(TransportError):
    """The SSH private key parameter is missing or unreadable."""


class HostKeyMismatch(TransportError):
    """The server's host key is not the pinned one; nothing was run."""


class AuthenticationFailed(TransportError):
    """The server refused our key; nothing was run."""


class TransportUnavailable(TransportError):
    """The SSH server cannot be reached yet (refused, reset, timed out, no banner); nothing was run."""

    retryable = True


class CommandTimeout(TransportError):
    """The command started but did not finish within the time allowed; it may still be running."""


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    host_key: str  # OpenSSH public key line: "ssh-ed25519 AAAA..."

    @classmethod
    def from_parameter(cls, json_text: str) -> SshEndpoint:
        try:
            data = json.loads(json_text)
        except (TypeError, ValueError) as exc:
            raise InvalidEndpoint(f"ssh-endpoint parameter is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidEndpoint("ssh-endpoint parameter must be a JSON object with host, port, host_key")
        host, port, host_key = data.get("host"), data.get("port"), data.get("host_key")
        if not isinstance(host, str) or not host.strip():
            raise InvalidEndpoint("ssh-endpoint parameter needs a non-empty string 'host'")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidEndpoint(f"ssh-endpoint parameter needs an integer 'port' in 1..65535, got {port!r}")
        if not isinstance(host_key, str):
            raise InvalidEndpoint("ssh-endpoint parameter needs a string 'host_key' (an OpenSSH public key)")
        endpoint = cls(host=host.strip(), port=port, host_key=" ".join(host_key.split()[:2]))
        endpoint.public_key()  # validates the key line
        return endpoint

    def to_parameter(self) -> str:
        return json.dumps({"host": self.host, "port": self.port, "host_key": self.host_key})

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko file a host key under: `host`, or `[host]:port` off port 22."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def public_key(self) -> paramiko.PKey:
        return parse_public_key(self.host_key)


@dataclass(frozen=True)
class CommandResult:
    exit_status: int  # -1 when the server reported none (killed by a signal, connection lost)
    stdout: bytes  # the last DEFAULT_OUTPUT_LIMIT_BYTES of it
    stderr: bytes  # the last DEFAULT_OUTPUT_LIMIT_BYTES of it


def parse_public_key(line: str) -> paramiko.PKey:
    fields = line.split()
    if len(fields) < 2 or fields[0] not in _SUPPORTED_KEY_TYPES:
        raise InvalidEndpoint(f"host_key must look like 'ssh-ed25519 AAAA...', got {line[:40]!r}")
    try:
        blob = base64.b64decode(fields[1], validate=True)
        return paramiko.PKey.from_type_string(fields[0], blob)
    except (binascii.Error, ValueError, paramiko.SSHException) as exc:
        raise InvalidEndpoint(f"host_key is not a valid {fields[0]} public key: {exc}") from exc


def endpoint_parameter_name(parameter_prefix: str, instance_id: str) -> str:
    return f"/{parameter_prefix.strip('/')}/instances/{instance_id}/ssh-endpoint"


def fetch_endpoint(ssm_client: Any, parameter_prefix: str, instance_id: str) -> SshEndpoint | None:
    """The endpoint the instance published, or None while it has published none."""
    name = endpoint_parameter_name(parameter_prefix, instance_id)
    try:
        response = ssm_client.get_parameter(Name=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise
    return SshEndpoint.from_parameter(response["Parameter"]["Value"])


def load_private_key(ssm_client: Any, parameter_name: str) -> paramiko.PKey:
    """Read an OpenSSH private key (ed25519, ECDSA or RSA, no passphrase) from a SecureString."""
    try:
        response = ssm_client.get_parameter(Name=parameter_name, WithDecryption=True)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
            raise PrivateKeyError(
                f"SSM parameter {parameter_name} does not exist: create it as a SecureString holding the "
                "OpenSSH private key (`batchworker local up` does this locally)"
            ) from exc
        raise
    text = response["Parameter"]["Value"]
    errors = []
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{key_class.__name__}: {exc}")
    raise PrivateKeyError(
        f"SSM parameter {parameter_name} holds no usable unencrypted OpenSSH private key "
        f"({'; '.join(errors)})"
    )


def probe(endpoint: SshEndpoint, timeout: float) -> bool:
    """True when a TCP connection succeeds and the server sends an SSH banner within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as sock:
            received = b""
            while b"\n" not in received and len(received) < 1024:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(256)
                if not chunk:
                    break
                received += chunk
    except OSError:
        return False
    # RFC 4253 allows other lines before the version line.
    return any(line.startswith(b"SSH-") for line in received.splitlines())


def run_with_stdin(
    endpoint: SshEndpoint,
    username: str,
    pkey: paramiko.PKey,
    command: str,
    stdin_bytes: bytes,
    timeout_seconds: float,
) -> CommandResult:
    """Run `command` on the endpoint, feeding it `stdin_bytes`, within `timeout_seconds` overall.

    Raises HostKeyMismatch, AuthenticationFailed or TransportUnavailable before anything runs, and
    CommandTimeout once the command has started.
    """
    deadline = time.monotonic() + timeout_seconds
    host_key = endpoint.public_key()
    client = paramiko.SSHClient()
    client.get_host_keys().add(endpoint.known_hosts_name, host_key.get_name(), host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        _connect(client, endpoint, username, pkey, timeout_seconds)
        channel = _start_command(client, endpoint, command, deadline)
        return _exchange(channel, stdin_bytes, deadline, endpoint, timeout_seconds)
    finally:
        client.close()


def _connect(
    client: paramiko.SSHClient, endpoint: SshEndpoint, username: str, pkey: paramiko.PKey, timeout: float
) -> None:
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        # The key exchange and login are small messages that wait for each other's answers: with Nagle's
        # algorithm on, each waited for the peer's delayed ACK (~90 ms per login against the local host,
        # 3 ms without). paramiko leaves the option as the socket has it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            client.connect(
                endpoint.host,
                port=endpoint.port,
                username=username,
                pkey=pkey,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                look_for_keys=False,
                allow_agent=False,
                sock=sock,
            )
        except BaseException:
            if client.get_transport() is None:  # else the transport owns it (client.close() closes both)
                sock.close()
            raise
    except paramiko.BadHostKeyException as exc:
        raise HostKeyMismatch(
            f"{where} presented host key {exc.key.get_name()} {exc.key.fingerprint}, expected "
            f"{exc.expected_key.fingerprint}: the endpoint parameter is stale or someone else answers there; "
            "check the instance's published ssh-endpoint before retrying"
        ) from exc
    except paramiko.AuthenticationException as exc:
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            # paramiko says "Authentication failed" also when the connection dropped or timed out during
            # authentication (an instance powering off): that is not a refusal, and trying again may work.
            raise TransportUnavailable(f"SSH to {where} closed during authentication: {exc!r}") from exc
        raise AuthenticationFailed(
            f"{where} refused user {username!r} with key {pkey.fingerprint}: "
            "install the matching public key in the instance's authorized_keys"
        ) from exc
    except (paramiko.SSHException, EOFError, OSError) as exc:
        # Refused, reset, timed out, no banner, closed during key exchange: not ready yet.
        raise TransportUnavailable(f"SSH to {where} not available: {exc!r}") from exc


def _start_command(
    client: paramiko.SSHClient, endpoint: SshEndpoint, command: str, deadline: float
) -> paramiko.Channel:
    transport = client.get_transport()
    try:
        if transport is None:
            raise paramiko.SSHException("transport closed after login")
        channel = transport.open_session(timeout=max(deadline - time.monotonic(), 0.001))
        channel.exec_command(command)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise TransportUnavailable(
            f"SSH to {endpoint.host}:{endpoint.port} closed before the command started: {exc!r}"
        ) from exc
    return channel


class _Tail:
    """Keeps the last `limit` bytes written to it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * self.limit:
            del self.data[: -self.limit]

    def value(self) -> bytes:
        return bytes(self.data[-self.limit :])


def _exchange(
    channel: paramiko.Channel, stdin_bytes: bytes, deadline: float, endpoint: SshEndpoint, timeout: float
) -> CommandResult:
    """Write stdin and read stdout and stderr in one loop, so no direction can block the others."""
    stdout, stderr = _Tail(DEFAULT_OUTPUT_LIMIT_BYTES), _Tail(DEFAULT_OUTPUT_LIMIT_BYTES)
    pending = memoryview(stdin_bytes)
    stdin_open = True
    channel.settimeout(0.0)
    while True:
        if time.monotonic() >= deadline:
            channel.close()
            raise CommandTimeout(
                f"command on {endpoint.host}:{endpoint.port} did not finish within {timeout:g} s; "
                "it may still be running there"
            )
        try:
            while stdin_open and pending and channel.send_ready():
                pending = pending[channel.send(pending[:_CHUNK_BYTES]) :]
        except (OSError, paramiko.SSHException):
            pending = memoryview(b"")  # the server closed the channel: nobody reads stdin any more
        if stdin_open and not pending:
            try:
                channel.shutdown_write()
            except (OSError, paramiko.SSHException, EOFError):
                pass
            stdin_open = False
        while channel.recv_ready():
            stdout.add(channel.recv(_CHUNK_BYTES))
        while channel.recv_stderr_ready():
            stderr.add(channel.recv_stderr(_CHUNK_BYTES))
        finished = channel.closed or (channel.exit_status_ready() and channel.eof_received)
        if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
            break
        wait = min(_POLL_SECONDS, max(deadline - time.monotonic(), 0.0))
        if stdin_open and pending:
            wait = min(wait, 0.005)  # window adjustments do not wake select()
        select.select([channel], [], [], wait)
    exit_status = channel.exit_status if channel.exit_status_ready() else -1
    return CommandResult(exit_status=exit_status, stdout=stdout.value(), stderr=stderr.value())
