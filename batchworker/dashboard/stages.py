"""A job's stages in time order: upload, trigger, instance start, job start, job end, manifest recorded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from batchworker.dashboard.job_index import JobRow
from batchworker.models import parse_time


@dataclass(frozen=True)
class Stage:
    name: str
    at: str | None
    note: str = ""
    after_upload_seconds: float | None = None
    since_previous_seconds: float | None = None


def job_stages(job: JobRow, manifest: dict | None, uploaded_at: str | None, instance_events: list[dict]) -> list[Stage]:
    """What happened to the job and when; a stage not reached yet has no time.

    The upload time is S3's LastModified, to the whole second; the last stage is the stop function
    recording the manifest in the job table (its `updated_at` once the job is final).

    The instance start is the last start of the job's instance before the job started; one that came
    before the job was queued means the instance was already up (a warm start).
    """
    timings = (manifest or {}).get("timings") or {}
    if not isinstance(timings, dict):
        timings = {}
    started = _time(timings.get("started_at")) or _time(job.running_since)
    finished = _time(timings.get("finished_at"))
    instance_start, note = None, ""
    if job.instance_id:
        starts = [
            e for e in instance_events
            if e["instance_id"] == job.instance_id and e["state"] == "start"
            and (started is None or parse_time(e["at"]) <= started)
        ]
        if starts:
            latest = max(starts, key=lambda e: e["at"])
            instance_start = parse_time(latest["at"])
            queued = _time(job.created_at)
            if queued and instance_start < queued:
                note = "started before this job was queued (for an earlier one)"
    stages = [
        Stage("uploaded", _iso(_time(uploaded_at)), "S3 time, to the second" if uploaded_at else "input object not found"),
        Stage("queued by the trigger", job.created_at or None),
        Stage("instance started", _iso(instance_start), note or (job.instance_id or "")),
        Stage("job started", _iso(started)),
        Stage("job ended", _iso(finished)),
        Stage("manifest recorded", job.updated_at if job.is_terminal and manifest else None, "by the stop function"),
    ]
    return _with_offsets(stages)


@dataclass(frozen=True)
class Segment:
    x: float
    width: float
    label: str
    seconds: float
    kind: int  # the index of the stage it ends at (a colour per step)


def stage_segments(stages: list[Stage], width: float = 1000.0) -> list[Segment]:
    """The steps between consecutive reached stages, laid out on `width` units from the first to the last."""
    reached: list[tuple[Stage, datetime]] = []
    for stage in stages:
        at = _time(stage.at)
        # An instance started before the job was queued (a warm start) is no step of this job: left out.
        if at is not None and (not reached or at >= reached[-1][1]):
            reached.append((stage, at))
    if len(reached) < 2:
        return []
    origin, end = reached[0][1], reached[-1][1]
    total = max((end - origin).total_seconds(), 1e-3)
    segments = []
    for (before, start), (after, stop) in zip(reached, reached[1:], strict=False):
        seconds = max(0.0, (stop - start).total_seconds())
        x = (start - origin).total_seconds() / total * width
        segments.append(Segment(round(x, 2), round(max(seconds / total * width, 0.5), 2),
                                f"{before.name} → {after.name}", seconds, stages.index(after)))
    return segments


def _with_offsets(stages: list[Stage]) -> list[Stage]:
    origin = next((_time(s.at) for s in stages if s.at), None)
    result, previous = [], None
    for stage in stages:
        at = _time(stage.at)
        if at is None or origin is None:
            result.append(stage)
            continue
        since_previous = (at - previous).total_seconds() if previous else None
        result.append(Stage(stage.name, stage.at, stage.note, (at - origin).total_seconds(), since_previous))
        previous = at
    return result


def _time(value) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = parse_time(value.split("#")[0])
    except ValueError:
        return None
    return moment if moment.tzinfo else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None
