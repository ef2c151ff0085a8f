"""`batchworker`: submit files, follow jobs, fetch results, and run the local cloud."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console

from batchworker.cli import costs_cmd, dashboard_cmd, job_cmd, status_table, transfer
from batchworker.cli.client import FIELDS, OPTIONAL_FIELDS, resolve
from batchworker.cli.follow import follow
from batchworker.cli.views import take_snapshot
from batchworker.errors import BatchworkerError
from batchworker.local import cloud
from batchworker.local.paths import local_dir
from batchworker.local.state import LocalOptions
from batchworker.models import JobStatus, utc_now
from batchworker.routing import param_metadata

out = Console()
err = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.command(args)
    except BatchworkerError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    except TimeoutError as exc:
        err.print(f"[red]timeout:[/red] {exc}")
        return 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchworker", description=__doc__)
    where = parser.add_argument_group(
        "deployment (default: environment, then a running local cloud, then terraform outputs)"
    )
    for name in FIELDS + OPTIONAL_FIELDS:
        where.add_argument("--" + name.replace("_", "-"), dest=name, metavar=name.upper())
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="upload files; each becomes a job")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--key-prefix", default="", help="prefix for the object keys (default: none)")
    p.add_argument("--job", metavar="NAME", help="run the deployed job package NAME (uploads under NAME/)")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="job parameter (S3 metadata param-K); repeat for more")
    p.add_argument("--wait", action="store_true", help="follow the jobs and download their results")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for results with --wait")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait with --wait")
    p.set_defaults(command=cmd_submit)

    p = sub.add_parser("status", help="instances and jobs")
    p.add_argument("job", nargs="?", help="a job id, or the start of one as the table shows it")
    p.add_argument("--json", action="store_true", help="every value in full, as JSON")
    p.add_argument("--limit", type=int, default=30, help="jobs in the table, active then newest (0: all; default 30)")
    p.set_defaults(command=cmd_status)

    p = sub.add_parser("results", help="download a job's outputs and manifest")
    p.add_argument("job")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(command=cmd_results)

    p = sub.add_parser("logs", help="print a job's log")
    p.add_argument("job")
    p.set_defaults(command=cmd_logs)

    costs_cmd.add_parsers(sub)
    job_cmd.add_parsers(sub, deployment_of)
    dashboard_cmd.add_parser(sub)

    local = sub.add_parser("local", help="the local cloud (moto + terraform + local Lambda runtime + SSH hosts)")
    local_sub = local.add_subparsers(required=True, metavar="ACTION")
    p = local_sub.add_parser("up", help="start it in the background; returns when ready")
    defaults = LocalOptions()
    for name in dataclasses.asdict(defaults):
        kind = type(getattr(defaults, name))
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                       help=f"default {getattr(defaults, name)}")
    p.set_defaults(command=cmd_local_up)
    p = local_sub.add_parser("down", help="stop it and everything it started")
    p.set_defaults(command=cmd_local_down)
    p = local_sub.add_parser("env", help="print export lines for boto3, the AWS CLI and this CLI")
    p.set_defaults(command=cmd_local_env)
    return parser


def deployment_of(args):
    return resolve({name: getattr(args, name) for name in FIELDS + OPTIONAL_FIELDS})


def cmd_submit(args) -> int:
    deployment = deployment_of(args)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        err.print(f"[red]error:[/red] not a file: {', '.join(missing)}")
        return 2
    params = job_cmd.parse_params(args.param)
    job_cmd.check_submission(deployment, args.job, params, [path.name for path in args.files])
    prefix = f"{args.job}/" if args.job else ""
    named = {}
    for path in args.files:
        key = prefix + args.key_prefix + path.name
        job_id = transfer.upload(deployment, path, key, metadata=param_metadata(params))
        named[job_id] = path.name
        err.print(f"uploaded {path} -> s3://{deployment.input_bucket}/{key}  job {job_id}")
    if not args.wait:
        for job_id in named:
            out.print(job_id)
        return 0
    jobs = follow(deployment, named, err, args.timeout)
    for job in jobs:
        files = transfer.download_results(deployment, job.job_id, args.out)
        line = f"{named[job.job_id]}: {job.status.value.lower()} -> {files[0].parent}"
        out.print(line + (f"  error: {job.error}" if job.error else ""))
    return 0 if all(job.status is JobStatus.SUCCEEDED for job in jobs) else 1


def cmd_status(args) -> int:
    snapshot = take_snapshot(deployment_of(args), [args.job] if args.job else None)
    if args.job and not snapshot.jobs:
        err.print(f"[red]error:[/red] no job {args.job}")
        return 1
    if args.json:
        print(json.dumps(snapshot.to_json(), indent=2))
    else:
        status_table.render(snapshot.instances, snapshot.jobs, out, utc_now(), limit=args.limit)
    return 0


def cmd_results(args) -> int:
    files = transfer.download_results(deployment_of(args), args.job, args.out)
    for path in files:
        out.print(str(path))
    return 0


def cmd_logs(args) -> int:
    deployment = deployment_of(args)
    log = transfer.read_job_log(deployment, args.job)
    manifest = transfer.read_manifest(deployment, args.job)
    if log is None and manifest is None:
        snapshot = take_snapshot(deployment, [args.job])
        if not snapshot.jobs:
            err.print(f"[red]error:[/red] no job {args.job}")
            return 1
        job = snapshot.jobs[0]
        err.print(f"job {args.job} is {job.status.value}; no log yet" + (f" (last error: {job.error})" if job.error else ""))
        return 0
    if log:
        sys.stdout.write(log if log.endswith("\n") else log + "\n")
    if manifest and manifest.get("error"):
        err.print(f"[red]job failed:[/red] {manifest['error']}")
    return 0


def cmd_local_up(args) -> int:
    options = LocalOptions(**{name: getattr(args, name) for name in dataclasses.asdict(LocalOptions())})
    state = cloud.up(local_dir(), options, progress=lambda phase: err.print(f"local cloud: {phase}"))
    out.print(f"local cloud ready: AWS endpoint {state['endpoint_url']}")
    out.print(f"input bucket  {state['outputs']['input_bucket']}\noutput bucket {state['outputs']['output_bucket']}")
    out.print('use it from a shell: eval "$(batchworker local env)"')
    return 0


def cmd_local_down(args) -> int:
    was_running = cloud.down(local_dir())
    err.print("local cloud stopped" if was_running else "no local cloud was running")
    return 0


def cmd_local_env(args) -> int:
    print(cloud.export_lines(cloud.environment(local_dir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
