"""EC2 instance state-change events for the local cloud, delivered to Lambda targets as EventBridge does.

moto changes an instance's state at StartInstances / StopInstances but sends no "EC2 Instance State-change
Notification", and its EventBridge delivers to SQS, log group, bus and HTTP targets, not to Lambda functions
(moto 5.2, `events/models.py` `Rule.send_to_targets`). The supervisor runs moto in its own process; `install()`
patches both there: each state change an EC2 call makes is put on the default bus (as EC2 does), and the
event, when a rule matches it, goes to each Lambda target of the rule as an asynchronous invocation of the
local Lambda runtime (`deliver_to(invoke_url)`), from a background thread: EventBridge delivers apart from
the API call that caused the change. Only the final state is sent (`running`, `stopped`, `terminated`): moto
has no `pending` or `stopping` in between. It also sets LaunchTime at every start, as EC2 does. Each change
also wakes the instance's local host at once (a datagram to the port in its ready.json): its boot begins at
StartInstances, as on AWS, not a poll later.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import re
import socket
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)

DETAIL_TYPE = "EC2 Instance State-change Notification"
_deliveries: queue.Queue[tuple[str, str]] = queue.Queue()
_invoke_url: list[str] = []  # set once the local Lambda runtime is up
_installed = threading.Event()
_instances_dir: list[Path] = []  # the local cloud's instances/<instance id>/ folders (the hosts' state dirs)
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")


def install(instances_dir: Path | None = None) -> None:
    """Patch moto (in this process) to send state-change events and deliver them to Lambda targets, and to
    wake the instance hosts under `instances_dir` at each state change of their instance."""
    _instances_dir[:] = [instances_dir] if instances_dir is not None else []
    if _installed.is_set():
        return
    from moto.ec2.models.instances import InstanceBackend
    from moto.events.models import Rule

    for name in ("start_instances", "stop_instances", "terminate_instances"):
        setattr(InstanceBackend, name, _sending_state_changes(getattr(InstanceBackend, name)))
    original_send = Rule.send_to_targets

    def send_to_targets(rule, event, transform_input=True):
        lambdas = [t for t in rule.targets if ":lambda:" in t["Arn"]]
        if len(lambdas) < len(rule.targets):  # moto delivers the others (it raises on a Lambda target)
            others = copy.copy(rule)
            others.targets = [t for t in rule.targets if t not in lambdas]
            original_send(others, event, transform_input)
        # A scheduled rule has no pattern (moto matches everything with it); it only ever gets its schedule.
        if not lambdas or rule.state != "ENABLED" or not rule.event_pattern.get_pattern():
            return
        if rule.event_pattern.matches_event(event):
            for target in lambdas:
                payload = target.get("Input") or json.dumps(event, default=str)
                _deliveries.put((target["Arn"].split(":")[6], payload))

    Rule.send_to_targets = send_to_targets
    threading.Thread(target=_deliver_forever, name="eventbridge-to-lambda", daemon=True).start()
    _installed.set()


def deliver_to(invoke_url: str) -> None:
    """Events matched from now on are delivered to the local Lambda runtime at `invoke_url`."""
    _invoke_url[:] = [invoke_url.rstrip("/")]


def state_change_entry(account_id: str, region: str, instance_id: str, state: str) -> dict:
    """The PutEvents entry of EC2's notification (the bus adds id, account, region and time: moto's default
    input template wants its own numeric time, so none is given here)."""
    return {
        "Source": "aws.ec2",
        "DetailType": DETAIL_TYPE,
        "Detail": json.dumps({"instance-id": instance_id, "state": state}),
        "Resources": [f"arn:aws:ec2:{region}:{account_id}:instance/{instance_id}"],
    }


def wake_host(ready_file: Path) -> None:
    """Tell an instance host (by the state_change_port of its ready.json) that its instance changed state."""
    try:
        port = int(json.loads(ready_file.read_bytes()[:4096])["state_change_port"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"state-change", ("127.0.0.1", port))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no host (yet): it sees the change at its poll
        logger.debug("instance host of %s not woken: %r", ready_file.parent.name, exc)


def _sending_state_changes(original):
    def changing_state(backend, instance_ids, *args, **kwargs):
        changed = original(backend, instance_ids, *args, **kwargs)
        from moto.events.models import events_backends

        for instance, previous in changed:
            if instance.state == "running" and previous.name != "running":
                _set_launch_time(instance)
        if _instances_dir:  # after LaunchTime: the host's look at the instance must see this start's
            for instance, previous in changed:
                if instance.state != previous.name and INSTANCE_ID.fullmatch(instance.id):
                    wake_host(_instances_dir[0] / instance.id / "ready.json")

        entries = [
            state_change_entry(backend.account_id, backend.region_name, instance.id, instance.state)
            for instance, previous in changed
            if instance.state != previous.name
        ]
        bus = events_backends[backend.account_id][backend.region_name]
        try:
            for start in range(0, len(entries), 10):  # PutEvents takes 10 entries a call
                bus.put_events(entries[start : start + 10])
        except Exception:  # noqa: BLE001 - the emulator's own failure must never fail the EC2 call
            logger.exception("state-change events of %s not sent", [e["Detail"] for e in entries])
        return changed

    return changing_state


def _set_launch_time(instance) -> None:
    """EC2 sets LaunchTime at every start; moto keeps the first launch's. LaunchTime has one-second
    resolution and an EC2 stop takes far longer than that, but moto stops at once: a start within the second
    of the previous one is dated a second later, so every start has its own LaunchTime (the local instance
    host tells a stop and start it did not see apart by it)."""
    from moto.core.utils import utcnow

    instance.launch_time = max(utcnow(), instance.launch_time + timedelta(seconds=1))


def _deliver_forever() -> None:
    while True:
        function_name, payload = _deliveries.get()
        if not _invoke_url:
            logger.info("state-change event for %s dropped: the Lambda runtime is not up yet", function_name)
            continue
        request = urllib.request.Request(
            f"{_invoke_url[0]}/2015-03-31/functions/{quote(function_name)}/invocations",
            data=payload.encode(), method="POST", headers={"X-Amz-Invocation-Type": "Event"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:  # EventBridge retries; a lost event is the reaper's
            logger.warning("state-change event for %s not delivered: %s", function_name, exc)
