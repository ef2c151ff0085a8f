"""Billing: per-second with a 60 s minimum, busy time, a running instance, the saving against 9-to-5."""

from datetime import UTC, datetime, timedelta

import pytest

from batchworker.costs.billing import (
    PRICES,
    JobInterval,
    billed_seconds,
    billed_seconds_for_run,
    build_cost_report,
    busy_seconds,
    days_covered,
    ebs_dollars,
    instance_intervals,
    job_intervals,
    price_of,
)
from batchworker.errors import ConfigurationError
from batchworker.models import Job, JobStatus, isoformat

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return isoformat(T0 + timedelta(seconds=seconds))


def event(seconds: float, state: str, instance_id: str = "i-a") -> dict:
    return {"instance_id": instance_id, "at": at(seconds), "state": state, "reason": "test"}


def job(
    seconds_from: float, seconds_to: float, instance_id: str | None = "i-a", job_id: str = "j-1"
) -> JobInterval:
    return JobInterval(
        job_id, instance_id, T0 + timedelta(seconds=seconds_from), T0 + timedelta(seconds=seconds_to)
    )


@pytest.mark.parametrize(
    ("running", "billed"),
    [(0, 60), (1, 60), (30, 60), (59.9, 60), (60, 60), (60.2, 61), (61, 61), (3600, 3600), (3600.001, 3601)],
)
def test_per_second_billing_with_a_60_second_minimum(running, billed):
    assert billed_seconds_for_run(running) == billed


def test_every_start_pays_its_own_minimum():
    # GIVEN three short runs of 10 s and one of 200 s
    events = [
        event(0, "start"),
        event(10, "stop"),
        event(100, "start"),
        event(110, "stop"),
        event(200, "start"),
        event(210, "stop"),
        event(300, "start"),
        event(500, "stop"),
    ]
    # THEN each short run bills 60 s, the long one 200 s
    assert billed_seconds(instance_intervals(events, T0 + timedelta(hours=1))) == 3 * 60 + 200


def test_intervals_pair_starts_and_stops_per_instance_in_any_order():
    events = [
        event(50, "stop", "i-b"),
        event(100, "stop"),
        event(0, "start"),
        event(10, "start", "i-b"),
        event(20, "start"),
        event(100, "stop"),
    ]  # a repeated start and a repeated stop change nothing
    intervals = instance_intervals(events, T0 + timedelta(hours=1))
    assert [(i.instance_id, i.running_seconds, i.still_running) for i in intervals] == [
        ("i-a", 100.0, False),
        ("i-b", 40.0, False),
    ]


def test_history_starting_with_a_stop_ignores_it():
    intervals = instance_intervals(
        [event(0, "stop"), event(10, "start"), event(80, "stop")], T0 + timedelta(hours=1)
    )
    assert [i.running_seconds for i in intervals] == [70.0]


def test_running_instance_is_billed_up_to_now():
    now = T0 + timedelta(seconds=500)
    intervals = instance_intervals([event(0, "start"), event(100, "stop"), event(200, "start")], now)
    assert intervals[-1].still_running and intervals[-1].end == now
    assert billed_seconds(intervals) == 100 + 300


def test_overlapping_jobs_count_once_and_only_while_running():
    intervals = instance_intervals([event(0, "start"), event(1000, "stop")], T0 + timedelta(hours=1))
    jobs = [
        job(100, 300),  # overlaps the next one: 100..400 counts 300 s
        job(200, 400, job_id="j-2"),
        job(900, 1100, job_id="j-3"),  # clipped at the stop: 100 s
        job(500, 600, instance_id="i-other", job_id="j-4"),  # another instance, never running
        job(500, 600, instance_id=None, job_id="j-5"),  # never placed
    ]
    assert busy_seconds(jobs, intervals) == pytest.approx(300 + 100)


def test_report_utilization_cost_and_saving_against_9_to_5():
    # GIVEN one day with two runs: 30 min and 30 min, busy 20 + 20 minutes
    events = [event(0, "start"), event(1800, "stop"), event(7200, "start"), event(9000, "stop")]
    jobs = [job(60, 1260), job(7260, 8460, job_id="j-2")]
    # WHEN the report is built the same day
    report = build_cost_report(events, jobs, T0 + timedelta(hours=6), "g4dn.xlarge")
    # THEN billed 3600 s at $0.526/h against 8 h of the always-on pattern
    assert report.days == 1
    assert report.billed_seconds == 3600
    assert report.busy_seconds == pytest.approx(2400)
    assert report.utilization == pytest.approx(2 / 3)
    assert report.cost_dollars == pytest.approx(0.526)
    assert report.always_on_cost_dollars == pytest.approx(8 * 0.526)
    assert report.saving_dollars == pytest.approx(7 * 0.526)
    assert report.saving_fraction == pytest.approx(7 / 8)
    assert report.to_json()["instances"][0]["starts"] == 2


def test_saving_counts_every_calendar_day_since_the_first_start():
    events = [event(0, "start"), event(3600, "stop")]
    report = build_cost_report(events, [], T0 + timedelta(days=2), "g5.xlarge")
    assert report.days == 3
    assert report.always_on_billed_seconds == 3 * 8 * 3600
    assert report.saving_dollars == pytest.approx((24 - 1) * PRICES["g5.xlarge"])


def test_empty_history_costs_nothing():
    report = build_cost_report([], [], T0, "g4dn.xlarge")
    assert (report.billed_seconds, report.days, report.cost_dollars, report.saving_dollars) == (
        0,
        0,
        0.0,
        0.0,
    )


def test_job_intervals_use_finished_jobs_with_an_instance():
    def make(job_id, status, instance_id="i-a"):
        return Job(job_id, status, "in", "k", instance_id=instance_id, created_at=at(0), updated_at=at(90))

    jobs = [
        make("j-1", JobStatus.SUCCEEDED),
        make("j-2", JobStatus.FAILED),
        make("j-3", JobStatus.RUNNING),
        make("j-4", JobStatus.SUCCEEDED, instance_id=None),
    ]
    found = job_intervals(jobs)
    assert [(j.job_id, (j.end - j.start).total_seconds()) for j in found] == [("j-1", 90.0), ("j-2", 90.0)]



def test_job_intervals_start_when_the_jobs_code_started():
    job = Job("j-1", JobStatus.SUCCEEDED, "in", "k", instance_id="i-a", created_at=at(0), updated_at=at(90),
              running_since=at(60))
    (found,) = job_intervals([job])
    assert (found.end - found.start).total_seconds() == 30.0


def test_price_table_and_unknown_type():
    assert price_of("g4dn.xlarge") == 0.526 and price_of("g5.xlarge") == 1.006
    with pytest.raises(ConfigurationError, match="--hourly-price-dollars"):
        price_of("p5.48xlarge")


def test_days_covered_and_ebs():
    assert days_covered(T0, T0) == 1
    assert days_covered(T0, T0 + timedelta(hours=15)) == 2  # crosses midnight UTC
    assert ebs_dollars(100, 730 * 3600) == pytest.approx(8.0)  # 100 GB for one 730-hour month
