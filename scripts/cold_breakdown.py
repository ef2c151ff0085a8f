"""Where a cold start's time goes, per stage, from the logs a bench cloud leaves behind (docs/bench.md).

    .venv/bin/python scripts/cold_breakdown.py $BATCHWORKER_LOCAL_DIR/bench-four

after `scripts/bench.py --clouds four --only cold_cycles`. For each cold job (input key under bench/cold/,
whose name starts with the upload's time in ns): upload -> the trigger's StartInstances done (trigger log)
-> the instance host sees it running (host log) -> [boot delay] -> SSH login at the host -> `launch`
started -> the job started in the warm server (job.log) -> job finished; and when the boot-time prewarm was
warm, from its boot command's start (boot.log). Prints the median, min and max of each stage.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from datetime import datetime, timezone
from pathlib import Path

BOOT_DELAY_SECONDS = 2.0  # scripts/bench.py's
STARTED = re.compile(r"started instance (i-[0-9a-f]+): job (j-[0-9a-f]+)")
WARM = re.compile(r"warm after ([0-9.]+) s")


def stamp(text: str) -> float:
    """Unix time of "2026-12-03 02:39:28,596", "2026-12-03 02:39:28,596+0000" or "2026-12-03T02:39:28.596Z"."""
    text = text.replace(",", ".").replace("T", " ").rstrip("Z").split("+")[0]
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def json_lines(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def host_times(log: Path, needle: str) -> list[float]:
    return [stamp(line[:23]) for line in log.read_text(errors="replace").splitlines() if needle in line]


def cycles(cloud: Path) -> list[dict[str, float]]:
    started_by_job = {}
    for record in json_lines(cloud / "lambda-runtime" / "logs" / "batchworker-trigger.log"):
        if match := STARTED.match(str(record.get("message", ""))):
            started_by_job[match.group(2)] = stamp(record["timestamp"])
    rows = []
    for instance in sorted((cloud / "instances").iterdir()):
        if not (instance / "boot.log").exists():
            continue  # never booted
        host_log = cloud / "logs" / f"instance-{instance.name}.log"
        running = host_times(host_log, "is running; accepting")
        logins, launches = host_times(host_log, "login attempt"), host_times(host_log, "started pid")
        boots = host_times(host_log, "boot command started")
        warm = [(stamp(line[:23]), float(m.group(1))) for line in (instance / "boot.log").read_text(
            errors="replace").splitlines() if (m := WARM.search(line))]
        for job_log in sorted((instance / "jobs").glob("j-*/job.log")):
            events: dict[str, tuple[float, dict]] = {}
            for record in json_lines(job_log):
                events.setdefault(record.get("event", ""), (stamp(record["at"]), record))
            if "job started" not in events or "job finished" not in events:
                continue
            key = str(events["job started"][1].get("input_key", ""))
            trigger = started_by_job.get(job_log.parent.name)
            if "/cold/" not in key or trigger is None:
                continue
            uploaded = int(key.rsplit("/", 1)[1].split("-")[0]) / 1e9
            start, finished = events["job started"][0], events["job finished"][0]
            seen = max((t for t in running if t <= start), default=None)
            if seen is None or seen < trigger - 1.0:  # not this job's boot (the trigger logs after StartInstances)
                continue
            login = min(t for t in logins if t >= seen)
            launch = min(t for t in launches if t >= login)
            boot = min(t for t in boots if t >= seen)
            warm_at = min((at for at, _ in warm if at >= boot), default=float("nan"))
            rows.append({
                "upload -> StartInstances done": trigger - uploaded,
                "-> host sees running": seen - trigger,
                "boot delay end -> SSH login": login - (seen + BOOT_DELAY_SECONDS),
                "-> launch started": launch - login,
                "-> job started (warm server)": start - launch,
                "-> job finished": finished - start,
                "upload -> finished - boot delay": finished - uploaded - BOOT_DELAY_SECONDS,
                "(prewarm warm after boot start)": warm_at - boot,
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cloud", type=Path, help="the bench cloud's folder, e.g. <local dir>/bench-four")
    rows = cycles(parser.parse_args().cloud)
    if not rows:
        print("no cold cycle found")
        return 1
    print(f"{len(rows)} cold cycles: median [min - max] s")
    for stage in rows[0]:
        values = [row[stage] for row in rows]
        print(f"  {stage:34s} {statistics.median(values):6.3f} [{min(values):.3f} - {max(values):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
