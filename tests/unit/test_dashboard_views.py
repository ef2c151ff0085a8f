"""The dashboard's pure parts: window clipping for billing, job stages, results summaries, cost windows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from batchworker.costs.billing import build_cost_report
from batchworker.dashboard.artifacts import summarize_results
from batchworker.dashboard.cost_view import cost_windows, jobs_as_trace
from batchworker.dashboard.job_index import JobRow
from batchworker.dashboard.stages import job_stages
from batchworker.dashboard.usage import events_in_window
from batchworker.models import isoformat

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def at(minutes: float) -> str:
    return isoformat(NOW + timedelta(minutes=minutes))


def row(**fields) -> JobRow:
    base = dict(job_id="j-0123456789abcdef", status="SUCCEEDED", input_bucket="in", input_key="a.png",
                created_at=at(-30), updated_at=at(-20), instance_id="i-1", running_since=at(-28))
    return JobRow(**{**base, **fields})


def test_a_run_that_began_before_the_window_is_billed_from_the_window_start():
    events = [{"instance_id": "i-1", "at": at(-120), "state": "start"},
              {"instance_id": "i-1", "at": at(-10), "state": "stop"},
              {"instance_id": "i-2", "at": at(-100), "state": "start"},
              {"instance_id": "i-2", "at": at(-90), "state": "stop"}]
    clipped = events_in_window(events, NOW - timedelta(minutes=60))
    assert [(e["instance_id"], e["state"], e["at"]) for e in clipped] == [
        ("i-1", "start", at(-60)), ("i-1", "stop", at(-10))]
    report = build_cost_report(clipped, [], NOW, "g4dn.xlarge")
    assert report.billed_seconds == 50 * 60


def test_stages_mark_a_warm_start_and_leave_unreached_stages_empty():
    running = row(status="RUNNING", updated_at=at(-28))
    events = [{"instance_id": "i-1", "at": at(-40), "state": "start"}]
    stages = {s.name: s for s in job_stages(running, None, at(-30.1), events)}
    assert stages["instance started"].at == at(-40) and "before this job was queued" in stages["instance started"].note
    assert stages["job started"].at == at(-28)
    assert stages["job ended"].at is None and stages["manifest recorded"].at is None
    assert stages["queued by the trigger"].since_previous_seconds is not None


def test_results_summary_counts_labels_and_bins_confidence_over_hostile_rows():
    text = "item,label,confidence\na,3,0.95\nb,3,1.0\nc,10,0.05\nd,2,not-a-number\ne,2,nan\n"
    summary = summarize_results("predictions.csv", text, truncated=False)
    assert summary.rows_read == 5 and summary.head[0] == ["a", "3", "0.95"]
    assert summary.label_counts == [("2", 2), ("3", 2), ("10", 1)]  # class numbers in their own order
    assert summary.confidence_bins[9] == 2 and summary.confidence_bins[0] == 1 and sum(summary.confidence_bins) == 3


def test_cost_windows_compare_the_bill_with_always_on_and_start_per_upload():
    events = [{"instance_id": "i-1", "at": at(-31), "state": "start"},
              {"instance_id": "i-1", "at": at(-19), "state": "stop"}]
    windows = cost_windows(events, [row()], NOW, "g4dn.xlarge", 0.526)
    today = windows[0]
    assert [w.name for w in windows] == ["today", "7 days", "30 days"]
    assert today.billed_gpu_hours == 12 / 60 and today.jobs == 1
    assert today.always_on_dollars == 8 * 0.526
    assert today.per_upload_starts == 1 and today.per_upload_dollars > 0


def test_only_finished_jobs_enter_the_simulated_trace():
    trace = jobs_as_trace([row(), row(job_id="j-1111111111111111", status="RUNNING")], NOW - timedelta(hours=1), 1)
    assert len(trace.jobs) == 1 and trace.jobs[0].duration_seconds == 8 * 60


def test_stage_bar_spans_the_reached_stages_and_leaves_out_a_warm_start():
    from batchworker.dashboard.stages import stage_segments

    finished = row(updated_at=at(-20))
    events = [{"instance_id": "i-1", "at": at(-90), "state": "start"}]  # up long before: a warm start
    manifest = {"timings": {"started_at": at(-28), "finished_at": at(-21)}}
    segments = stage_segments(job_stages(finished, manifest, at(-30), events), 1000)
    assert [s.label for s in segments] == ["uploaded → queued by the trigger", "queued by the trigger → job started",
                                           "job started → job ended", "job ended → manifest recorded"]
    assert segments[0].x == 0 and abs(sum(s.width for s in segments) - 1000) < 2


def test_timeline_draws_thousands_of_jobs_as_a_bounded_number_of_spans():
    from batchworker.dashboard.usage import build_timeline
    from batchworker.models import Instance, InstanceState

    events = [{"instance_id": "i-1", "at": at(-600), "state": "start"}, {"instance_id": "i-1", "at": at(-1), "state": "stop"}]
    jobs = [row(job_id=f"j-{n:016x}", created_at=at(-590 + n * 0.1), running_since=at(-590 + n * 0.1 + 0.02),
                updated_at=at(-590 + n * 0.1 + 0.05)) for n in range(5000)]
    timeline = build_timeline([Instance("i-1", InstanceState.STOPPED, "g4dn.xlarge")], events, jobs, NOW,
                              NOW - timedelta(minutes=601), "g4dn.xlarge", 0.526)
    only = timeline.rows[0]
    assert len(only.running) == 1 and 0 < len(only.busy) <= 1000
    assert only.busy[0].label.endswith("jobs")
    assert timeline.report.busy_seconds > 0 and only.billed_seconds == 599 * 60
