"""The local instance host against a moto server, driven through the production SSH client."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncssh
import boto3
import paramiko
import pytest
from moto.server import ThreadedMotoServer

from batchworker.local import ec2_events
from batchworker.transports.ssh import (
    AuthenticationFailed,
    CommandTimeout,
    HostKeyMismatch,
    SshEndpoint,
    TransportUnavailable,
    fetch_endpoint,
    load_private_key,
    probe,
    run_with_stdin,
)

PREFIX = "/batchworker"
KEY_PARAMETER = "/batchworker/ssh/private-key"
BOOT_DELAY_SECONDS = 1.0


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped yet


@dataclass
class Cloud:
    env: dict[str, str]
    ec2: object
    ssm: object
    image_id: str
    pkey: object
    authorized_key_file: Path


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    ec2_events.install()  # as the local cloud's moto: LaunchTime set at every start, as EC2 does
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        session = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        ec2 = session.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"])
        ssm = session.client("ssm", endpoint_url=env["AWS_ENDPOINT_URL"])
        images = ec2.describe_images(Filters=[{"Name": "name", "Values": ["Deep Learning AMI*"]}])["Images"]
        key = asyncssh.generate_private_key("ssh-ed25519")
        ssm.put_parameter(
            Name=KEY_PARAMETER, Value=key.export_private_key().decode(), Type="SecureString", Overwrite=True
        )
        authorized = tmp_path_factory.mktemp("client") / "authorized_keys"
        authorized.write_bytes(key.export_public_key())
        yield Cloud(env, ec2, ssm, images[0]["ImageId"], load_private_key(ssm, KEY_PARAMETER), authorized)
    finally:
        server.stop()


@dataclass
class Host:
    instance_id: str
    process: subprocess.Popen
    state_dir: Path
    ready: dict
    endpoint: SshEndpoint

    def run(self, cloud: Cloud, command: str, stdin: bytes = b"", timeout: float = 10.0):
        return run_with_stdin(self.endpoint, "ubuntu", cloud.pkey, command, stdin, timeout)


@pytest.fixture
def host(cloud: Cloud, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """A host for a fresh instance that is stopped, as the pool keeps them (extra arguments: indirect param)."""
    instance_id = cloud.ec2.run_instances(
        ImageId=cloud.image_id, MinCount=1, MaxCount=1, InstanceType="g4dn.xlarge"
    )["Instances"][0]["InstanceId"]
    cloud.ec2.stop_instances(InstanceIds=[instance_id])
    state_dir = tmp_path / "instance"
    log = (tmp_path / "host.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "batchworker.local.instance_host", "--instance-id", instance_id,
         "--parameter-prefix", PREFIX, "--state-dir", str(state_dir),
         "--boot-delay-seconds", str(BOOT_DELAY_SECONDS), "--authorized-key-file",
         str(cloud.authorized_key_file), "--poll-interval-seconds", "0.1", "--deadman-check-seconds", "0.2",
         *getattr(request, "param", [])],
        env={**os.environ, **cloud.env}, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        ready_file = state_dir / "ready.json"
        wait_for(lambda: ready_file.exists() or process.poll() is not None, 20, "ready.json")
        assert process.poll() is None, (tmp_path / "host.log").read_text()
        ready = json.loads(ready_file.read_text())
        endpoint = fetch_endpoint(cloud.ssm, PREFIX, instance_id)
        assert endpoint is not None
        yield Host(instance_id, process, state_dir, ready, endpoint)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()


def start_and_wait(cloud: Cloud, host: Host) -> float:
    started = time.monotonic()
    cloud.ec2.start_instances(InstanceIds=[host.instance_id])
    wait_for(lambda: probe(host.endpoint, 1.0), 15, "the SSH banner")
    return time.monotonic() - started


def launch_detached_sleep(cloud: Cloud, host: Host) -> int:
    # The shape of `batchworker-job launch`: a new session, stdio detached, the launcher exits.
    script = (
        "import subprocess; p = subprocess.Popen(['sleep', '300'], start_new_session=True, "
        "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
    )
    result = host.run(cloud, f'{sys.executable} -c "{script}"')
    assert result.exit_status == 0, result.stderr
    pid = int(result.stdout)
    assert is_alive(pid)
    return pid


def test_publishes_the_endpoint_it_listens_on(cloud: Cloud, host: Host) -> None:
    assert host.endpoint.host == "127.0.0.1"
    assert host.endpoint.port == host.ready["port"]
    assert host.endpoint.host_key.startswith("ssh-ed25519 AAAA")
    assert host.endpoint.host_key == host.ready["host_key"]
    assert host.ready["pid"] == host.process.pid


def test_refuses_ssh_while_stopped_and_during_boot(cloud: Cloud, host: Host) -> None:
    assert not probe(host.endpoint, 1.0)
    with pytest.raises(TransportUnavailable):
        host.run(cloud, "true")

    elapsed = start_and_wait(cloud, host)

    assert elapsed >= BOOT_DELAY_SECONDS


def test_runs_command_with_stdin_and_returns_output(cloud: Cloud, host: Host) -> None:
    start_and_wait(cloud, host)
    payload = bytes(range(256)) * 1000

    result = host.run(cloud, "cat", payload)

    assert (result.exit_status, result.stdout[-1000:], result.stderr) == (0, payload[-1000:], b"")
    assert len(result.stdout) == 64 * 1024  # only the tail is kept


def test_command_text_goes_through_bin_sh(cloud: Cloud, host: Host) -> None:
    start_and_wait(cloud, host)

    result = host.run(cloud, 'echo "$BATCHWORKER_INSTANCE_ID" $(echo sub); echo oops >&2; exit 3')

    assert result.exit_status == 3
    assert result.stdout == f"{host.instance_id} sub\n".encode()
    assert result.stderr == b"oops\n"
    env = host.run(cloud, 'printf %s "$BATCHWORKER_JOB_ROOT"').stdout
    assert env == str(host.state_dir / "jobs").encode()


def test_wrong_host_key_raises_and_runs_nothing(cloud: Cloud, host: Host, tmp_path: Path) -> None:
    start_and_wait(cloud, host)
    impostor_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    pinned_wrong = replace(host.endpoint, host_key=" ".join(impostor_key.split()[:2]))
    marker = tmp_path / "marker"

    with pytest.raises(HostKeyMismatch):
        run_with_stdin(pinned_wrong, "ubuntu", cloud.pkey, f"touch {marker}", b"", 10)

    time.sleep(0.3)
    assert not marker.exists()
    host.run(cloud, f"touch {marker}")
    assert marker.exists()


def test_unknown_client_key_is_refused(cloud: Cloud, host: Host, tmp_path: Path) -> None:
    start_and_wait(cloud, host)
    stranger = paramiko.Ed25519Key.from_private_key(
        io.StringIO(asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode())
    )
    marker = tmp_path / "marker"

    with pytest.raises(AuthenticationFailed):
        run_with_stdin(host.endpoint, "ubuntu", stranger, f"touch {marker}", b"", 10)

    assert not marker.exists()


def test_large_stdout_and_stderr_do_not_deadlock(cloud: Cloud, host: Host) -> None:
    start_and_wait(cloud, host)

    result = host.run(
        cloud, "head -c 3000000 /dev/zero >&2 & head -c 3000000 /dev/zero; wait; echo END", timeout=30
    )

    assert result.exit_status == 0
    assert result.stdout.endswith(b"\0END\n")
    assert result.stderr == b"\0" * 64 * 1024


def test_stdout_after_stderr_closes_still_arrives(cloud: Cloud, host: Host) -> None:
    # SSH has one EOF per channel: closing stderr must not cut off what stdout writes afterwards.
    start_and_wait(cloud, host)

    result = host.run(cloud, "exec 2>&-; sleep 0.3; echo END", timeout=10)

    assert (result.exit_status, result.stdout, result.stderr) == (0, b"END\n", b"")


def test_command_timeout(cloud: Cloud, host: Host) -> None:
    start_and_wait(cloud, host)
    started = time.monotonic()

    with pytest.raises(CommandTimeout):
        host.run(cloud, "sleep 30", timeout=1.0)

    assert time.monotonic() - started < 3


def test_stopping_the_instance_kills_its_processes_and_sessions(cloud: Cloud, host: Host) -> None:
    start_and_wait(cloud, host)
    detached_pid = launch_detached_sleep(cloud, host)
    outcome: list[object] = []
    session = threading.Thread(target=lambda: outcome.append(_run_catching(host, cloud, "sleep 301")))
    session.start()
    wait_for(lambda: _sessions_running(host), 5, "the sleep session to start")

    cloud.ec2.stop_instances(InstanceIds=[host.instance_id])

    wait_for(lambda: not is_alive(detached_pid), 5, "the detached job to die")
    session.join(5)
    assert not session.is_alive()
    assert isinstance(outcome[0], TransportUnavailable) or outcome[0].exit_status == -1
    assert not probe(host.endpoint, 1.0)
    assert host.process.poll() is None


def test_dead_man_timer_stops_the_instance_once_nothing_runs(
    cloud: Cloud, host: Host, tmp_path: Path
) -> None:
    start_and_wait(cloud, host)
    # GIVEN a job process still alive and a dead-man timer that ran out (a 1-second idle period)
    pid = launch_detached_sleep(cloud, host)
    timer = {"expires_at": time.time() - 1, "idle_shutdown_seconds": 1}
    (host.state_dir / "jobs" / ".deadman").write_text(json.dumps(timer))
    # THEN the instance stays up while the process lives
    time.sleep(1.0)
    assert instance_state(cloud, host) == "running"
    # WHEN the process ends
    os.kill(pid, signal.SIGKILL)
    # THEN the host stops its own instance, as `shutdown -h` would, and powers off
    wait_for(lambda: instance_state(cloud, host) in ("stopping", "stopped"), 10, "the instance to stop")
    wait_for(lambda: not probe(host.endpoint, 0.5), 10, "SSH to go away")
    assert "dead-man timer expired: stopping" in (tmp_path / "host.log").read_text()
    assert host.process.poll() is None


def test_sigterm_stops_host_and_its_processes(cloud: Cloud, host: Host) -> None:
    start_and_wait(cloud, host)
    detached_pid = launch_detached_sleep(cloud, host)

    host.process.send_signal(signal.SIGTERM)

    assert host.process.wait(10) == 0
    assert not is_alive(detached_pid)
    assert not (host.state_dir / "ready.json").exists()
    assert not probe(host.endpoint, 0.5)
    key_file = host.state_dir / "ssh_host_ed25519_key"
    assert key_file.stat().st_mode & 0o077 == 0
    published = asyncssh.read_private_key(str(key_file)).export_public_key().decode()
    assert host.endpoint.host_key.split()[1] in published


def instance_state(cloud: Cloud, host: Host) -> str:
    reservations = cloud.ec2.describe_instances(InstanceIds=[host.instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def _run_catching(host: Host, cloud: Cloud, command: str) -> object:
    try:
        return host.run(cloud, command, timeout=30)
    except TransportUnavailable as exc:
        return exc


def _sessions_running(host: Host) -> bool:
    marker = f"BATCHWORKER_INSTANCE_ID={host.instance_id}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and b"sleep 301" in Path(
                environ.parent, "cmdline"
            ).read_bytes().replace(b"\0", b" "):
                return True
        except OSError:
            continue
    return False


BOOT_SCRIPT = """
import os, pathlib, sys, time
root = pathlib.Path(os.environ["BATCHWORKER_JOB_ROOT"])
(root / f"booted-{os.getpid()}").write_text(os.environ["BATCHWORKER_INSTANCE_ID"])
time.sleep(300)
"""


@pytest.mark.parametrize("host", [["--boot-command", json.dumps([sys.executable, "-c", BOOT_SCRIPT])]],
                         indirect=True)
def test_boot_command_starts_with_every_boot_and_dies_at_stop(cloud: Cloud, host: Host) -> None:
    jobs = host.state_dir / "jobs"
    assert not list(jobs.glob("booted-*"))  # stopped: nothing runs
    started = time.monotonic()
    cloud.ec2.start_instances(InstanceIds=[host.instance_id])
    first = wait_for(lambda: list(jobs.glob("booted-*")), 15, "the boot command")[0]
    # It runs during the boot, with the instance's environment, as a systemd unit would.
    assert first.read_text() == host.instance_id
    wait_for(lambda: probe(host.endpoint, 1.0), 15, "the SSH banner")
    assert time.monotonic() - started >= BOOT_DELAY_SECONDS
    pid = int(first.name.removeprefix("booted-"))
    assert is_alive(pid)

    cloud.ec2.stop_instances(InstanceIds=[host.instance_id])
    wait_for(lambda: not is_alive(pid), 10, "the boot command to die with the instance")
    cloud.ec2.start_instances(InstanceIds=[host.instance_id])
    wait_for(lambda: len(list(jobs.glob("booted-*"))) == 2, 15, "the boot command of the second boot")


@pytest.mark.parametrize("host", [["--boot-command", json.dumps([sys.executable, "-c", BOOT_SCRIPT])]],
                         indirect=True)
def test_a_stop_and_start_between_two_polls_still_powers_off(cloud: Cloud, host: Host) -> None:
    # GIVEN a running instance with its boot command
    jobs = host.state_dir / "jobs"
    cloud.ec2.start_instances(InstanceIds=[host.instance_id])
    first = wait_for(lambda: list(jobs.glob("booted-*")), 15, "the boot command")[0]
    pid = int(first.name.removeprefix("booted-"))
    # WHEN it is stopped and started again while the host does not look (frozen, so no poll sees "stopped")
    os.kill(host.process.pid, signal.SIGSTOP)
    try:
        cloud.ec2.stop_instances(InstanceIds=[host.instance_id])
        cloud.ec2.start_instances(InstanceIds=[host.instance_id])
    finally:
        os.kill(host.process.pid, signal.SIGCONT)
    # THEN the previous running period's processes die and the boot command starts again, as after any stop
    wait_for(lambda: not is_alive(pid), 10, "the first boot's process to die")
    wait_for(lambda: len(list(jobs.glob("booted-*"))) == 2, 15, "the boot command of the second boot")


@pytest.mark.parametrize("host", [["--poll-interval-seconds", "60"]], indirect=True)
def test_a_state_change_datagram_wakes_the_host_at_once(cloud: Cloud, host: Host) -> None:
    # As moto's patched EC2 calls do in the local cloud (local/ec2_events.py): the boot begins at
    # StartInstances, not at the next poll (60 s away here), and the stop powers off at once.
    cloud.ec2.start_instances(InstanceIds=[host.instance_id])
    started = time.monotonic()
    ec2_events.wake_host(host.state_dir / "ready.json")
    wait_for(lambda: probe(host.endpoint, 1.0), BOOT_DELAY_SECONDS + 10, "the SSH banner")
    assert BOOT_DELAY_SECONDS <= time.monotonic() - started < BOOT_DELAY_SECONDS + 10
    pid = launch_detached_sleep(cloud, host)

    cloud.ec2.stop_instances(InstanceIds=[host.instance_id])
    ec2_events.wake_host(host.state_dir / "ready.json")
    wait_for(lambda: not is_alive(pid), 10, "the instance's processes to die at the stop")
    assert not probe(host.endpoint, 1.0)
