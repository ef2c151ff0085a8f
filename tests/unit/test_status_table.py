"""`batchworker status` as a table: every line fits 80 columns, ids stay unique when cut, times read as ages."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console

from batchworker.cli import status_table
from batchworker.models import Instance, InstanceState, Job, JobStatus, isoformat, utc_now

NOW = utc_now()


def ago(seconds: float) -> str:
    return isoformat(NOW - timedelta(seconds=seconds))


def sample() -> tuple[list[Instance], list[Job]]:
    instances = [Instance("i-6c1b0a5d7e8f9a0b1", InstanceState.RUNNING, "g5.xlarge", NOW - timedelta(minutes=7)),
                 Instance("i-0f3e2d1c0b9a87654", InstanceState.STOPPED, "g5.xlarge", NOW - timedelta(hours=5))]
    long_key = "uploads/2026/12/02/customer-batch-0042/a very long scan name 000123.png"
    jobs = [
        Job("j-0123456789abcdef", JobStatus.RUNNING, "in", long_key, instance_id=instances[0].instance_id,
            created_at=ago(70), updated_at=ago(5), running_since=ago(60), attempts=1, items_done=412, items_total=1000),
        Job("j-0123456700000000", JobStatus.QUEUED, "in", "digits.csv", created_at=ago(3), updated_at=ago(3)),
        Job("j-aaaabbbbccccdddd", JobStatus.FAILED, "in", "broken.csv", instance_id=instances[1].instance_id,
            created_at=ago(7200), updated_at=ago(7100), attempts=2, error="row 1 has 3 values; " + "x" * 200),
    ]
    return instances, jobs


def rendered(width: int, **kwargs) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False)
    status_table.render(*sample(), console, NOW, **kwargs)
    return console.export_text().splitlines()


def test_every_line_fits_80_columns_and_keeps_the_file_name():
    lines = rendered(80)
    assert max(len(line.rstrip()) for line in lines) <= 80
    running = next(line for line in lines if "running" in line and line.startswith("j-"))
    assert "000123.png" in running and "412/1000" in running and "i-6c1b0a5d" in running
    assert any(line.startswith("j-aaaabbbb") and "attempt 2; ro" in line for line in lines)
    assert lines[-1] == "3 jobs: 1 queued, 1 running, 1 failed"


def test_a_wide_terminal_shows_more_of_the_error_and_a_limit_hides_the_oldest():
    assert any("row 1 has 3 values; xxxxxxxxxx" in line for line in rendered(160))
    lines = rendered(80, limit=2)
    assert not any(line.startswith("j-aaaa") for line in lines)  # failed and oldest: after the active ones
    assert "1 older not shown" in lines[-1]


def test_short_ids_grow_only_where_two_would_be_equal():
    cut = status_table.short_ids(["j-0123456789abcdef", "j-0123456700000000", "i-6c1b0a5d7e8f9a0b1"])
    assert len(set(cut.values())) == 3
    assert cut["j-0123456789abcdef"] == "j-0123456789"
    assert status_table.short_ids(["j-aaaabbbbccccdddd"]) == {"j-aaaabbbbccccdddd": "j-aaaabbbb"}
    assert status_table.short_ids(["j-aa", "j-aa"]) == {"j-aa": "j-aa"}


def test_ages_read_like_kubectl():
    assert [status_table.age(ago(s), NOW) for s in (0, 59, 119, 120, 7199, 7200, 3 * 86400)] == [
        "0s", "59s", "119s", "2m", "119m", "2h", "3d"]
    assert status_table.age(None, NOW) == "-"


def test_what_the_instance_cannot_reach_comes_first_in_the_note_and_is_said_once():
    problem = "cannot reach S3 (https://s3.us-east-1.amazonaws.com: TimeoutError); add a gateway VPC endpoint for S3"
    waiting = Job("j-0123456789abcdef", JobStatus.DISPATCHED, "in", "a.png", created_at=ago(30),
                  lease_expires_at=ago(-60), instance_problem=problem)
    assert status_table.note(waiting, NOW) == f"instance {problem}; queued 30s, waiting for a slot"
    failed = Job("j-0123456789abcdef", JobStatus.FAILED, "in", "a.png", created_at=ago(30), instance_problem=problem,
                 error=f"its instance reported: {problem}. The job stopped reporting progress 1 time(s); ...")
    assert status_table.note(failed, NOW).startswith("its instance reported: cannot reach S3 (")
    assert status_table.note(failed, NOW).count("cannot reach S3") == 1
