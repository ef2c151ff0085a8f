"""Placement from the ledger's per-instance job counts: the conditional write, and trigger batches placing at once."""

from __future__ import annotations

import sys
import threading
from collections import Counter

import boto3

from batchworker.config import Settings
from batchworker.control import Upload, accept_upload, finish_job
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.placement import Placer
from tests.functional.conftest import PREFIX

TABLE = f"{PREFIX}-instance-events"
BOUNDED_SECONDS = 60  # every wait in these tests ends by then


def test_place_refuses_a_job_past_the_limit_and_a_finished_job_frees_its_slot(stack):
    ledger = InstanceLedger(TABLE)
    me = stack.instance_id
    # GIVEN an instance with two slots, both taken
    generations = [ledger.place(me, f"j-{n}", max_jobs=2) for n in (1, 2)]
    assert generations == [1, 2]
    # THEN a third job is refused, and the record is unchanged
    assert ledger.place(me, "j-3", max_jobs=2) is None
    assert ledger.read(me).placed_job_ids == {"j-1", "j-2"} and ledger.read(me).generation == 2
    # AND a retried delivery of a job placed there already goes through, adding nothing
    assert ledger.place(me, "j-2", max_jobs=2) == 3
    assert ledger.read(me).placed_job_ids == {"j-1", "j-2"}
    # WHEN a job's manifest is recorded (the stop function), its slot is free again
    ledger.note_activity(me, job_ids=["j-1"])
    assert ledger.place(me, "j-3", max_jobs=2) == 4
    # AND the reaper's repair frees slots the same way
    ledger.release(me, ["j-2", "j-3"])
    assert ledger.read(me).placed_job_ids == set()
    assert ledger.place(me, "j-4", max_jobs=1) == 5


def test_a_placement_voids_a_stop_decided_before_it(stack):
    ledger = InstanceLedger(TABLE)
    entry = ledger.read(stack.instance_id)  # a stop decision read the record and found nothing placed
    assert ledger.place(stack.instance_id, "j-1", max_jobs=4) == 1
    assert ledger.claim_stop(stack.instance_id, entry.generation) is False


def test_a_batch_shares_one_start_then_spreads_and_goes_past_the_limit_only_when_all_are_full(stack):
    _, _, pool, ledger = _parts(stack.env)
    (other,) = _more_instances(1)
    first, second = sorted([stack.instance_id, other])
    placer = Placer(pool.list(), ledger, max_jobs_per_instance=2)
    placements = [placer.place(f"j-{n:016x}") for n in range(5)]
    assert [(p.instance_id, p.start, p.over_limit) for p in placements] == [
        (first, True, False), (first, False, False),  # the burst shares the first start until it is full
        (second, True, False), (second, False, False),  # then the queue is deeper: start the second
        (first, False, True),  # everything full: wait on the least loaded, past the limit
    ]


def test_a_batch_planning_from_an_old_reading_takes_the_next_instance_when_refused(stack):
    _, _, pool, ledger = _parts(stack.env)
    (other,) = _more_instances(1)
    # GIVEN two batches that read the pool's ledger items before either placed anything
    early, late = Placer(pool.list(), ledger, 1), Placer(pool.list(), ledger, 1)
    chosen = early.place("j-a").instance_id
    # WHEN the other places on its stale reading, the conditional write refuses the full instance
    placement = late.place("j-b")
    # THEN it goes to the other instance, and no instance holds more than one job
    assert placement.instance_id != chosen and not placement.over_limit
    entries = ledger.read_many([stack.instance_id, other])
    assert sorted(len(e.placed_job_ids) for e in entries.values()) == [1, 1]


def test_trigger_batches_placing_at_once_never_overfill_an_instance(http_stack):
    # the functional stack behind a real moto server (HTTP, one thread per request), with a pool of 3
    instance_ids = [http_stack.instance_id, *_more_instances(2)]
    env = http_stack.env
    max_jobs = 2
    env = {**env, "BATCHWORKER_MAX_JOBS_PER_INSTANCE": str(max_jobs)}
    # moto runs each request in its own thread and checks a condition and applies the update without a lock,
    # where DynamoDB applies a conditional write atomically: a long GIL switch interval keeps moto's check and
    # update together (threads still switch at every socket wait), so what is tested is this code, not moto.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        # GIVEN 3 trigger batches of 2 uploads each (as many jobs as the pool of 3 x 2 has slots) that all read
        # the pool and its ledger items before any of them places a job: every batch sees an empty, stopped pool
        first_wave = _batches_at_once(env, [[f"wave1/b{b}-{n}.png" for n in range(2)] for b in range(3)])
        # THEN every instance holds exactly its 2 jobs: none was overfilled while another had room
        counts = _placed_counts(instance_ids)
        assert sorted(counts.values()) == [max_jobs] * 3, counts
        assert Counter(first_wave.values()) == Counter(dict.fromkeys(instance_ids, max_jobs))
        # AND the job rows say the same as the ledger
        jobs = JobStore(env["BATCHWORKER_JOBS_TABLE"])
        assert {job_id: jobs.get(job_id).instance_id for job_id in first_wave} == first_wave
        # WHEN 3 more batches of one upload come at once with the pool full
        second_wave = _batches_at_once(env, [[f"wave2/b{b}.png"] for b in range(3)])
        # THEN they wait for slots past the limit (nothing else is free), the pool holding all 9
        counts = _placed_counts(instance_ids)
        assert sum(counts.values()) == 9 and min(counts.values()) >= max_jobs, counts
        # AND once a job's manifest is recorded, the next batch's job takes that slot, no other
        settings, jobs, pool, ledger = _parts(env)
        freed_on = sorted(instance_ids, key=lambda i: counts[i])[0]
        for job_id in [j for j, i in {**first_wave, **second_wave}.items() if i == freed_on]:
            finish_job({"job_id": job_id, "status": "succeeded"}, f"jobs/{job_id}/manifest.json", jobs, ledger)
        third_wave = _batches_at_once(env, [["wave3/only.png"]])
        assert list(third_wave.values()) == [freed_on]
    finally:
        sys.setswitchinterval(interval)


def _more_instances(count: int) -> list[str]:
    """More stopped instances in the stack's pool."""
    ec2 = boto3.client("ec2")
    ids = [i["InstanceId"] for i in ec2.run_instances(
        ImageId=ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"], MinCount=count, MaxCount=count,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "batchworker:pool", "Value": PREFIX}]}],
    )["Instances"]]
    ec2.stop_instances(InstanceIds=ids)
    return ids


def _parts(env: dict):
    settings = Settings.from_env({**env, "BATCHWORKER_TRANSPORT": "ssh"})
    jobs = JobStore(settings.jobs_table)
    pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table))
    ledger = InstanceLedger(settings.instance_events_table)
    return settings, jobs, pool, ledger


def _batches_at_once(env: dict, batches: list[list[str]]) -> dict[str, str]:
    """Each batch as the trigger runs one (its own clients, one Placer, accept_upload per upload), all planning
    before any places; returns job id -> the instance it was placed on."""
    ready = threading.Barrier(len(batches), timeout=BOUNDED_SECONDS)
    placed: dict[str, str] = {}
    errors: list[BaseException] = []

    def batch(keys: list[str], parts, s3) -> None:
        settings, jobs, pool, ledger = parts
        try:
            placer = Placer(pool.list(), ledger, settings.max_jobs_per_instance)
            ready.wait()
            for key in keys:
                upload = Upload(settings.input_bucket, key, 1, "etag", "v1")
                accept_upload(upload, settings, jobs, pool, ledger,
                              lambda job_id, instance_id: placed.__setitem__(job_id, instance_id), s3, placer)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    # Clients are made here, one set per batch as each Lambda invocation has its own: boto3's default session
    # is not safe to make clients from in several threads at once (the clients themselves are).
    threads = [threading.Thread(target=batch, args=(keys, _parts(env), boto3.client("s3")), daemon=True)
               for keys in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUNDED_SECONDS)
    assert not any(thread.is_alive() for thread in threads), "a batch did not finish in time"
    assert not errors, errors
    assert len(placed) == sum(len(keys) for keys in batches)
    return placed


def _placed_counts(instance_ids: list[str]) -> dict[str, int]:
    entries = InstanceLedger(TABLE).read_many(instance_ids)
    return {instance_id: len(entry.placed_job_ids) for instance_id, entry in entries.items()}

