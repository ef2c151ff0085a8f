"""Local stand-in for one GPU EC2 instance: an SSH server that lives and dies with the moto instance state.

Like the instance's systemd timer (worker/deadman.py), it stops its own instance through moto when the
jobs' dead-man timer has expired and none of the instance's processes is alive. Like the instance's
systemd unit batchworker-prewarm, it starts a boot command (`batchworker-job prewarm`) each time the
instance turns running, during the boot delay, killed with everything else at power off.
Run as `python -m batchworker.local.instance_host --instance-id i-... --state-dir DIR ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh
import boto3
from botocore.exceptions import BotoCoreError, ClientError

from batchworker.local import call_log
from batchworker.transports.ssh import SshEndpoint, endpoint_parameter_name

# Fault switches (issue 14): a file of this name in the host's state dir cuts the instance off that service,
# as a private subnet without its VPC endpoint; every process started after it appears (the boot command
# included) gets an endpoint that refuses connections. `no-dynamodb` cuts off DynamoDB, and so on.
UNREACHABLE_SWITCHES = {"no-s3": "AWS_ENDPOINT_URL_S3", "no-dynamodb": "AWS_ENDPOINT_URL_DYNAMODB",
                        "no-ssm": "AWS_ENDPOINT_URL_SSM"}
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused

logger = logging.getLogger("batchworker.local.instance_host")

LISTEN_HOST = "127.0.0.1"
INSTANCE_ID_VARIABLE = "BATCHWORKER_INSTANCE_ID"
INSTANCE_APP_ID = "batchworker-instance"  # AWS_SDK_UA_APP_ID of what runs on the instance
DEADMAN_NAME = ".deadman"  # under the job root; written by the jobs (worker/deadman.py)
DEFAULT_IDLE_SHUTDOWN_SECONDS = 600.0  # the jobs' default, for a timer file that does not say
_PIPE_CHUNK_BYTES = 64 * 1024


def marked_pids(instance_id: str) -> list[int]:
    """Live processes (not this one) whose environment carries BATCHWORKER_INSTANCE_ID=<instance_id>."""
    marker = f"{INSTANCE_ID_VARIABLE}={instance_id}".encode()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, a kernel thread, or not ours to read
            continue
        if marker in environ.split(b"\0"):  # a zombie's environ is empty: dead
            pids.append(int(entry.name))
    return pids


def kill_marked_processes(instance_id: str) -> list[int]:
    """SIGKILL every process whose environment carries BATCHWORKER_INSTANCE_ID=<instance_id>."""
    killed: list[int] = []
    for _ in range(10):  # repeat: a process may fork while we scan
        found = 0
        for pid in marked_pids(instance_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            found += 1
            killed.append(pid)
        if not found:
            break
    return sorted(set(killed))


def read_deadman(path: Path) -> tuple[float, float] | None:
    """(expires_at unix time, idle_shutdown_seconds) from the jobs' timer file; None without a usable one."""
    try:
        raw = json.loads(path.read_bytes()[:4096])
        expires_at = float(raw["expires_at"])
        idle = float(raw.get("idle_shutdown_seconds") or DEFAULT_IDLE_SHUTDOWN_SECONDS)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return expires_at, idle


class _SshServer(asyncssh.SSHServer):
    def __init__(self, host: InstanceHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._host.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        assert self._conn is not None
        if not self._host.is_accepting():  # powered off between accept and login
            self._conn.close()
            return True
        logger.info("login attempt for user %r from %s", username, self._conn.get_extra_info("peername"))
        return True

    def password_auth_supported(self) -> bool:
        return False


class InstanceHost:
    def __init__(
        self,
        instance_id: str,
        parameter_prefix: str,
        state_dir: Path,
        boot_delay_seconds: float,
        authorized_key_file: Path,
        port: int = 0,
        poll_interval_seconds: float = 0.2,
        deadman_check_seconds: float = 5.0,
        ec2_client: Any = None,
        ssm_client: Any = None,
        boot_command: list[str] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.parameter_prefix = parameter_prefix
        self.state_dir = state_dir
        self.boot_delay_seconds = boot_delay_seconds
        self.authorized_key_file = authorized_key_file
        self.port = port
        self.poll_interval_seconds = poll_interval_seconds
        self.deadman_check_seconds = deadman_check_seconds  # 0: never stop on the dead-man timer
        self.boot_command = boot_command  # argv, started at every boot (None: nothing)
        self.ec2 = ec2_client or boto3.client("ec2")
        self.ssm = ssm_client or boto3.client("ssm")
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self.processes: set[asyncio.subprocess.Process] = set()
        self.ready_file = state_dir / "ready.json"
        self.deadman_file = state_dir / "jobs" / DEADMAN_NAME
        self._running_since: float | None = None
        self._launch_time: Any = None  # LaunchTime of the running period being served
        self._state: str | None = None
        self._stop = asyncio.Event()
        self._state_changed = asyncio.Event()  # set by a datagram from moto's EC2 (local/ec2_events.py)
        self._handshakes: set[asyncio.Task[None]] = set()
        self._boot_reapers: set[asyncio.Task[None]] = set()

    def is_accepting(self) -> bool:
        since = self._running_since
        return since is not None and time.monotonic() - since >= self.boot_delay_seconds

    async def serve(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        (self.state_dir / "home").mkdir(exist_ok=True)
        (self.state_dir / "jobs").mkdir(exist_ok=True)
        host_key = self._load_host_key()
        options = asyncssh.SSHServerConnectionOptions(
            server_factory=lambda: _SshServer(self),
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.read_authorized_keys(str(self.authorized_key_file)),
            process_factory=self._run_process,
            encoding=None,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            login_timeout=30,
        )
        listener = socket.create_server((LISTEN_HOST, self.port), backlog=128)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        public_key = " ".join(host_key.export_public_key("openssh").decode().split()[:2])
        endpoint = SshEndpoint(host=LISTEN_HOST, port=self.port, host_key=public_key)
        name = endpoint_parameter_name(self.parameter_prefix, self.instance_id)
        await asyncio.to_thread(
            self._publisher_ssm().put_parameter, Name=name, Value=endpoint.to_parameter(), Type="String",
            Overwrite=True,
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        # The port moto's patched EC2 calls send a datagram to at each state change of this instance
        # (local/ec2_events.py): the boot begins at StartInstances, as on AWS, not up to a poll later.
        wake, _ = await loop.create_datagram_endpoint(lambda: _Wake(self._state_changed),
                                                      local_addr=(LISTEN_HOST, 0))
        await self._poll_once()
        tasks = [
            asyncio.create_task(self._watch_instance()),
            asyncio.create_task(self._accept(listener, options)),
        ]
        if self.deadman_check_seconds > 0:
            tasks.append(asyncio.create_task(self._watch_deadman()))
        self._write_ready_file(endpoint, name, wake.get_extra_info("sockname")[1])
        logger.info("instance %s: SSH on %s:%d, endpoint published to %s", self.instance_id, LISTEN_HOST,
                    self.port, name)
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            listener.close()
            wake.close()
            await self._power_off("instance host shutting down")
            self.ready_file.unlink(missing_ok=True)
            logger.info("instance %s: host stopped", self.instance_id)

    def _load_host_key(self) -> asyncssh.SSHKey:
        path = self.state_dir / "ssh_host_ed25519_key"
        if path.exists():
            return asyncssh.read_private_key(str(path))
        key = asyncssh.generate_private_key("ssh-ed25519")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.export_private_key())
        return key

    def _write_ready_file(self, endpoint: SshEndpoint, parameter_name: str, state_change_port: int) -> None:
        ready = {"pid": os.getpid(), "port": self.port, "host": endpoint.host, "host_key": endpoint.host_key,
                 "instance_id": self.instance_id, "parameter": parameter_name,
                 "state_change_port": state_change_port}
        partial = self.ready_file.with_suffix(".tmp")
        partial.write_text(json.dumps(ready) + "\n")
        partial.replace(self.ready_file)

    async def _accept(self, listener: socket.socket, options: asyncssh.SSHServerConnectionOptions) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(listener)
            if not self.is_accepting():
                # Reset at once, before any banner: the client sees a host that is not up (yet).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                logger.debug("refused connection from %s: instance %s", peer, self._state)
                continue
            task = asyncio.create_task(self._run_connection(sock, options))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _run_connection(
        self, sock: socket.socket, options: asyncssh.SSHServerConnectionOptions
    ) -> None:
        try:
            await asyncssh.run_server(sock, options=options)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            logger.debug("SSH connection ended before login (a probe, or a client giving up): %r", exc)

    async def _watch_instance(self) -> None:
        while True:  # the poll stays: a datagram may be lost, and a test's moto may send none
            try:
                await asyncio.wait_for(self._state_changed.wait(), self.poll_interval_seconds)
            except asyncio.TimeoutError:
                pass
            self._state_changed.clear()
            await self._poll_once()

    async def _poll_once(self) -> None:
        try:
            response = await asyncio.to_thread(self.ec2.describe_instances, InstanceIds=[self.instance_id])
            instance = response["Reservations"][0]["Instances"][0]
            state, launch_time = instance["State"]["Name"], instance.get("LaunchTime")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                logger.warning("describe_instances failed, keeping state %s: %s", self._state, exc)
                return
            state = "terminated"
        except (BotoCoreError, IndexError, KeyError) as exc:
            logger.warning("describe_instances failed, keeping state %s: %r", self._state, exc)
            return
        previous, self._state = self._state, state
        if state == "running" and self._running_since is not None and launch_time != self._launch_time:
            # A stop and a start both fell between two polls (EC2 sets LaunchTime at every start): the
            # instance was off in between, so nothing of the previous running period may survive.
            self._running_since = None
            await self._power_off("stopped and started again between two polls")
        if state == "running":
            if self._running_since is None:
                self._running_since, self._launch_time = time.monotonic(), launch_time
                logger.info("instance %s is running; accepting SSH after %.1f s of boot", self.instance_id,
                            self.boot_delay_seconds)
                await self._start_boot_command()
        elif previous != state:
            self._running_since = None
            await self._power_off(f"instance is {state}")

    async def _start_boot_command(self) -> None:
        """As systemd starts the instance's units at boot: in its own session, output to boot.log."""
        if not self.boot_command:
            return
        try:
            with open(self.state_dir / "boot.log", "ab") as log:
                child = await asyncio.create_subprocess_exec(
                    *self.boot_command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                    env=self._environment("batchworker"), cwd=self.state_dir / "home", start_new_session=True)
        except OSError as exc:
            logger.warning("instance %s: boot command failed to start: %s", self.instance_id, exc)
            return
        self.processes.add(child)  # killed at power off, as every process of the instance
        logger.info("instance %s: boot command started, pid %d", self.instance_id, child.pid)

        async def reap() -> None:
            returncode = await child.wait()
            self.processes.discard(child)
            logger.info("instance %s: boot command pid %d exited with %d", self.instance_id, child.pid, returncode)

        task = asyncio.create_task(reap())
        self._boot_reapers.add(task)  # a reference, so the task is not collected early
        task.add_done_callback(self._boot_reapers.discard)

    async def _watch_deadman(self) -> None:
        while True:
            await asyncio.sleep(self.deadman_check_seconds)
            if self._state != "running" or not await asyncio.to_thread(self._is_deadman_expired):
                continue
            logger.warning("instance %s: dead-man timer expired: stopping", self.instance_id)
            try:  # as `shutdown -h` with instance-initiated shutdown behaviour = stop
                await asyncio.to_thread(self.ec2.stop_instances, InstanceIds=[self.instance_id])
            except (BotoCoreError, ClientError) as exc:
                logger.warning("stop_instances failed; trying again at the next check: %s", exc)

    def _is_deadman_expired(self) -> bool:
        """The timer ran out, the instance has been up that long since boot, and none of its processes lives.

        The boot rule is worker/deadman.py's uptime rule: a timer left from before a stop does not count
        against the job a fresh start is for.
        """
        timer = read_deadman(self.deadman_file)
        since = self._running_since
        if timer is None or since is None:
            return False
        expires_at, idle_seconds = timer
        if time.time() < expires_at or time.monotonic() - since < idle_seconds:
            return False
        return not marked_pids(self.instance_id)

    async def _power_off(self, reason: str) -> None:
        """What EC2 does at power off: every process dies, every connection drops."""
        groups = 0
        for process in list(self.processes):
            try:
                os.killpg(process.pid, signal.SIGKILL)
                groups += 1
            except ProcessLookupError:
                pass
        marked = await asyncio.to_thread(kill_marked_processes, self.instance_id)
        connections = list(self.connections)
        for conn in connections:
            conn.abort()
        level = logging.WARNING if groups or marked or connections else logging.INFO
        logger.log(level, "instance %s power off (%s): killed %d process group(s) and pids %s, dropped %d "
                   "connection(s)", self.instance_id, reason, groups, marked, len(connections))

    def _publisher_ssm(self) -> Any:
        """The client that publishes the endpoint: the instance's user data on AWS, so its calls are the instance's."""
        session = boto3.session.Session()
        if call_log.record_session(session, f"instance:{self.instance_id}"):
            return session.client("ssm")
        return self.ssm

    def _environment(self, username: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            INSTANCE_ID_VARIABLE: self.instance_id,
            "HOME": str(self.state_dir / "home"),
            "BATCHWORKER_JOB_ROOT": str(self.state_dir / "jobs"),
            "USER": username,
            "LOGNAME": username,
            # The job's AWS calls say so in their User-Agent (the recorded calls per job, by component).
            "AWS_SDK_UA_APP_ID": INSTANCE_APP_ID,
        })
        for switch, variable in UNREACHABLE_SWITCHES.items():
            if (self.state_dir / switch).exists():
                env[variable] = UNREACHABLE_ENDPOINT
        return call_log.child_environment(env, f"instance:{self.instance_id}")

    async def _run_process(self, process: asyncssh.SSHServerProcess) -> None:
        if process.subsystem:
            process.stderr.write(f"subsystem {process.subsystem} not supported\n".encode())
            process.exit(1)
            return
        # As sshd: the command goes to the shell as one string; no command means a shell reading stdin.
        argv = ["/bin/sh", "-c", process.command] if process.command is not None else ["/bin/sh"]
        username = process.get_extra_info("username")
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self._environment(username),
                cwd=self.state_dir / "home", start_new_session=True)
        except OSError as exc:
            process.stderr.write(f"cannot start /bin/sh: {exc}\n".encode())
            process.exit(127)
            return
        self.processes.add(child)
        logger.info("user %r started pid %d: %.200r", username, child.pid, process.command)
        feeder = asyncio.create_task(_copy_stdin(process.stdin, child.stdin))
        try:
            await asyncio.gather(_copy_output(child.stdout, process.stdout),
                                 _copy_output(child.stderr, process.stderr))
            # EOF applies to the whole channel, stdout and stderr alike: send it only once both are
            # drained, or output still in flight on the other stream is dropped.
            _write_eof(process.stdout)
            returncode = await child.wait()
        finally:
            feeder.cancel()
            self.processes.discard(child)
        logger.info("pid %d exited with %d", child.pid, returncode)
        try:
            if returncode >= 0:
                process.exit(returncode)
            else:
                process.exit_with_signal(signal.Signals(-returncode).name.removeprefix("SIG"))
        except (OSError, asyncssh.Error):
            pass  # the connection is gone already


class _Wake(asyncio.DatagramProtocol):
    """Any datagram means "the instance's state changed": look now (what it says is not trusted)."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._event.set()


async def _copy_stdin(source: asyncssh.SSHReader, target: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(_PIPE_CHUNK_BYTES):
            target.write(chunk)
            await target.drain()
        target.close()
    except (OSError, asyncssh.Error):
        target.close()  # the command stopped reading, or the session went away


async def _copy_output(source: asyncio.StreamReader, target: asyncssh.SSHWriter) -> None:
    writing = True
    while chunk := await source.read(_PIPE_CHUNK_BYTES):
        if not writing:
            continue  # keep draining so the command never blocks on a dead session
        try:
            target.write(chunk)
            await target.drain()
        except (OSError, asyncssh.Error):
            writing = False


def _write_eof(target: asyncssh.SSHWriter) -> None:
    try:
        target.write_eof()
    except (OSError, asyncssh.Error):
        pass  # the session went away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--parameter-prefix", required=True, help="SSM prefix, e.g. /batchworker")
    parser.add_argument("--state-dir", required=True, type=Path, help="host key, home, jobs, ready.json")
    parser.add_argument("--boot-delay-seconds", type=float, default=3.0)
    parser.add_argument("--authorized-key-file", required=True, type=Path, help="OpenSSH authorized_keys")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--poll-interval-seconds", type=float, default=0.2)
    parser.add_argument("--deadman-check-seconds", type=float, default=5.0,
                        help="how often to check the jobs' dead-man timer; 0 disables")
    parser.add_argument("--boot-command", type=json.loads, default=None,
                        help='JSON argv started each time the instance turns running, e.g. ["batchworker-job", "prewarm"]')
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    host = InstanceHost(args.instance_id, args.parameter_prefix, args.state_dir.resolve(),
                        args.boot_delay_seconds, args.authorized_key_file, args.port,
                        args.poll_interval_seconds, args.deadman_check_seconds, boot_command=args.boot_command)
    asyncio.run(host.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
