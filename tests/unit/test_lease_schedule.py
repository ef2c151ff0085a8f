"""worker.lease.Heartbeat's schedule: each job renewed every interval from its previous renewal's start."""

from __future__ import annotations

import statistics
import threading
import time
from itertools import pairwise

from worker.lease import Heartbeat
from worker.spec import Lease


class SlowTable:
    """A DynamoDB client whose UpdateItem takes `seconds` (a loaded moto), recording when each job was renewed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.renewed: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def update_item(self, **kwargs):
        with self._lock:
            self.renewed.setdefault(kwargs["Key"]["job_id"]["S"], []).append(time.monotonic())
        time.sleep(self.seconds)
        return {}


def test_a_round_of_slow_renewals_does_not_stretch_each_jobs_period():
    # GIVEN three jobs of a 3 s lease (renewed every 1 s) and renewals that take 0.3 s each
    table = SlowTable(0.3)
    jobs = [f"j-{n:016x}" for n in range(3)]
    heartbeat = Heartbeat({job: Lease("jobs", 3.0) for job in jobs}, client=table)
    # WHEN the heartbeat runs for a while
    heartbeat.start()
    time.sleep(6.5)
    heartbeat.stop()
    # THEN each job is renewed about every second (a pause after each 0.9 s round would make it 1.9 s)
    gaps = [later - earlier for times in table.renewed.values() for earlier, later in pairwise(times)]
    assert len(gaps) >= 9
    assert statistics.median(gaps) < 1.6, gaps
    assert max(gaps) < 3.0, gaps  # never a lapse


def test_finish_waits_for_one_renewal_at_most():
    # GIVEN a heartbeat in the middle of a round of slow renewals over many jobs
    table = SlowTable(0.3)
    jobs = [f"j-{n:016x}" for n in range(6)]
    heartbeat = Heartbeat({job: Lease("jobs", 30.0) for job in jobs}, client=table)
    heartbeat.start()
    time.sleep(0.1)
    # WHEN a job finishes (its manifest is about to go out)
    started = time.monotonic()
    heartbeat.finish(jobs[-1])
    ended = time.monotonic()
    heartbeat.stop()
    # THEN it waited for the renewal in flight (and at most one more), not for the rest of the round, and its
    # job was never renewed again
    during = [at for times in table.renewed.values() for at in times if started < at < ended]
    assert len(during) <= 1, (len(during), ended - started)
    assert len(table.renewed.get(jobs[-1], [])) <= 1
