"""The SSH transport tells a refused key (permanent: fix the key) from a connection lost during authentication
(an instance powering off: try again), against real asyncssh servers on loopback."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator

import asyncssh
import paramiko
import pytest

from batchworker.transports.ssh import AuthenticationFailed, SshEndpoint, TransportUnavailable, run_with_stdin


class _Refusing(asyncssh.SSHServer):
    """Offers public-key authentication and accepts no key."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False


class _DroppingDuringAuth(_Refusing):
    """Drops the connection in the middle of authentication, as a host that powers off."""

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self.conn.abort()
        return False


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def serve(loop: asyncio.AbstractEventLoop, factory: type[asyncssh.SSHServer]) -> tuple[SshEndpoint, asyncssh.SSHAcceptor]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")

    async def start() -> asyncssh.SSHAcceptor:
        return await asyncssh.create_server(factory, "127.0.0.1", 0, server_host_keys=[host_key])

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    port = server.sockets[0].getsockname()[1]
    public = " ".join(host_key.export_public_key("openssh").decode().split()[:2])
    return SshEndpoint(host="127.0.0.1", port=port, host_key=public), server


def close(loop: asyncio.AbstractEventLoop, server: asyncssh.SSHAcceptor) -> None:
    """On the loop's own thread: asyncio objects are not thread-safe (closed from the test's thread, the
    server raced the loop closing the dropped connection: TypeError in asyncio's Server._wakeup)."""

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)


def client_key() -> paramiko.PKey:
    key = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(key))


@pytest.mark.parametrize(("factory", "error", "says"), [
    (_Refusing, AuthenticationFailed, "refused user 'ubuntu'"),
    (_DroppingDuringAuth, TransportUnavailable, "closed during authentication"),
])
def test_a_refusal_is_permanent_and_a_drop_during_authentication_is_not(loop, factory, error, says) -> None:
    endpoint, server = serve(loop, factory)
    try:
        with pytest.raises(error, match=says):
            run_with_stdin(endpoint, "ubuntu", client_key(), "true", b"", 10)
    finally:
        close(loop, server)
