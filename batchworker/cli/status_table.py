"""`batchworker status` for a terminal: short ids, ages, one line per row, fitting 80 columns (`--json` has it all)."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

from batchworker.models import ACTIVE_STATUSES, Instance, Job, JobStatus, parse_time

MIN_ID_CHARS = 8  # after the "j-"/"i-" prefix; longer only where two shown ids would share them
INPUT_CHARS = 28  # longer keys keep their tail: the file name says more than the first folder
STATUS_STYLES = {
    JobStatus.QUEUED: "yellow", JobStatus.DISPATCHED: "yellow", JobStatus.RUNNING: "cyan",
    JobStatus.SUCCEEDED: "green", JobStatus.FAILED: "red",
}
STATE_STYLES = {"running": "green", "pending": "yellow", "stopping": "yellow", "stopped": "dim"}


def short_ids(ids: list[str]) -> dict[str, str]:
    """Each id cut to the shortest prefix (at least MIN_ID_CHARS after its dash) that no other id here shares."""
    width = MIN_ID_CHARS
    while True:
        cut = {i: i[: i.find("-") + 1 + width] for i in ids}
        if len(set(cut.values())) == len(set(ids)) or all(cut[i] == i for i in ids):
            return cut
        width += 2


def age(moment: str | datetime | None, now: datetime) -> str:
    """'42s', '7m', '3h', '12d': the largest unit that fits, as `kubectl get` and `docker ps` print it."""
    if not moment:
        return "-"
    seconds = (now - (parse_time(moment) if isinstance(moment, str) else moment)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def tail(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def progress(job: Job) -> str:
    if job.items_total is None:
        return "-"
    return f"{job.items_done or 0}/{job.items_total}"


def note(job: Job, now: datetime) -> str:
    """What the row cannot show in its columns: what its instance cannot reach, the error, the wait, the retries."""
    parts = []
    if job.instance_problem and job.instance_problem not in (job.error or ""):
        parts.append(f"instance {job.instance_problem}")  # first: a narrow NOTE column still shows it
    if job.status is JobStatus.QUEUED and job.capacity_wait_since:
        # "waiting for capacity: InsufficientInstanceCapacity: no g5.xlarge capacity for i-... in us-east-1a; ..."
        parts.append(f"{job.waiting_reason or 'waiting for capacity'} (for {age(job.capacity_wait_since, now)})")
    elif job.status is JobStatus.QUEUED:
        parts.append(f"queued {age(job.created_at, now)}")
    elif job.status is JobStatus.DISPATCHED:  # waiting is not running: on the instance, its code not started
        parts.append(f"queued {age(job.created_at, now)}, " + ("waiting for a slot" if job.lease_expires_at else "starting"))
    elif job.status is JobStatus.RUNNING and job.running_since:
        parts.append(f"running {age(job.running_since, now)}")
    if job.attempts > 1:
        parts.append(f"attempt {job.attempts}")
    if job.error:
        parts.append(job.error)
    return "; ".join(parts)


def order(jobs: list[Job]) -> list[Job]:
    """Active jobs first, then the newest."""
    newest_first = sorted(jobs, key=lambda job: job.created_at, reverse=True)
    return sorted(newest_first, key=lambda job: job.status not in ACTIVE_STATUSES)


def _table(columns: list[str], rows: list[list[str | Text]], width: int, flexible: tuple[int, ...] = (),
           keep_tail: int | None = None) -> Table:
    """One line per row: the widest `flexible` column gives way, a character at a time, to fit `width`.

    Cut values end in an ellipsis, except in column `keep_tail`, whose values keep their end.
    """
    widths = [max([len(name), *(len(str(row[n])) for row in rows)]) for n, name in enumerate(columns)]
    over = sum(widths) + 2 * (len(columns) - 1) - width
    while over > 0 and (shrinkable := [n for n in flexible if widths[n] > max(len(columns[n]), 10)]):
        widths[max(shrinkable, key=lambda n: widths[n])] -= 1
        over -= 1
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for n, name in enumerate(columns):
        table.add_column(name, no_wrap=True, overflow="ellipsis", min_width=widths[n], max_width=widths[n])
    for row in rows:
        if keep_tail is not None:
            row = [*row[:keep_tail], tail(str(row[keep_tail]), widths[keep_tail]), *row[keep_tail + 1:]]
        table.add_row(*row)
    return table


def render(instances: list[Instance], jobs: list[Job], console: Console, now: datetime, limit: int = 0) -> None:
    load: dict[str, int] = {}
    for job in jobs:
        if job.instance_id and job.status in ACTIVE_STATUSES:
            load[job.instance_id] = load.get(job.instance_id, 0) + 1
    shown = order(jobs)[: limit or None]
    ids = short_ids([i.instance_id for i in instances] + [j.instance_id for j in shown if j.instance_id])
    rows = [
        [ids[i.instance_id], Text(i.state.value, STATE_STYLES.get(i.state.value, "")), i.instance_type,
         str(load.get(i.instance_id, 0)), age(i.launch_time, now)]
        for i in instances
    ]
    console.print(_table(["INSTANCE", "STATE", "TYPE", "JOBS", "LAUNCHED"], rows, console.width, flexible=(2,)))

    job_ids = short_ids([job.job_id for job in shown])
    rows = [
        [job_ids[job.job_id], Text(job.status.value.lower(), STATUS_STYLES[job.status]), tail(job.input_key, INPUT_CHARS),
         ids.get(job.instance_id or "", "-"), progress(job), age(job.created_at, now), note(job, now)]
        for job in shown
    ]
    columns = ["JOB", "STATUS", "INPUT", "INSTANCE", "PROGRESS", "AGE", "NOTE"]
    if all(job.items_total is None for job in shown):  # no runner here counts items: no column for it
        columns.remove("PROGRESS")
        rows = [row[:4] + row[5:] for row in rows]
    console.print(_table(columns, rows, console.width, flexible=(2, len(columns) - 1), keep_tail=2))
    counts = {status: sum(job.status is status for job in jobs) for status in JobStatus}
    summary = ", ".join(f"{n} {status.value.lower()}" for status, n in counts.items() if n)
    hidden = len(jobs) - len(shown)
    console.print(f"{len(jobs)} jobs: {summary or 'none'}" + (f"; {hidden} older not shown (--limit 0 for all)"
                                                                  if hidden else ""))
