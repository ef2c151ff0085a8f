"""Heartbeat.job_started: the RUNNING write leaves the job's path (the heartbeat thread makes it), carries the
moment the code started, and is always made before finish() returns (so before the job's manifest)."""

from __future__ import annotations

import datetime as dt
import threading

from worker.lease import Heartbeat
from worker.spec import Lease


class GatedClient:
    """Records update_item calls; a call blocks while the gate is closed (a slow DynamoDB)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[dict] = []
        self.entered = threading.Event()

    def update_item(self, **params) -> dict:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.calls.append(params)
        return {}


def running_writes(client: GatedClient) -> list[dict]:
    return [c for c in client.calls if "running_since" in c["UpdateExpression"]]


def test_job_started_does_not_wait_for_dynamodb_and_finish_writes_it_first():
    client = GatedClient()
    heartbeat = Heartbeat({"j-1": Lease("jobs", 90)}, client=client)
    heartbeat.start()
    assert client.entered.wait(10)  # the heartbeat thread is in its first renewal, held at the gate
    # WHEN the job's code starts while DynamoDB does not answer
    before = dt.datetime.now(dt.timezone.utc)
    heartbeat.job_started("j-1")  # returns: the write is the heartbeat thread's
    after = dt.datetime.now(dt.timezone.utc)
    assert running_writes(client) == []
    # AND the job finishes (finish() runs in its own thread; it waits for the renewal in flight)
    finisher = threading.Thread(target=heartbeat.finish, args=("j-1",))
    finisher.start()
    client.gate.set()
    finisher.join(30)
    assert not finisher.is_alive()
    # THEN the RUNNING write was made before finish() returned, with the moment the code started
    writes = running_writes(client)
    assert len(writes) == 1
    values = writes[0]["ExpressionAttributeValues"]
    assert values[":running"] == {"S": "RUNNING"}
    since = dt.datetime.fromisoformat(values[":since"]["S"].replace("Z", "+00:00"))
    assert before - dt.timedelta(milliseconds=1) <= since <= after + dt.timedelta(milliseconds=1)
    heartbeat.stop()


def test_without_a_heartbeat_thread_the_write_is_made_at_once():
    client = GatedClient()
    client.gate.set()
    heartbeat = Heartbeat({"j-1": Lease("jobs", 90)}, client=client)  # no thread: start() was not called
    heartbeat.job_started("j-1")
    assert len(running_writes(client)) == 1
