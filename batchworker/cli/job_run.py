"""`batchworker job run` and the runtime half of `job validate`: the instance's runner in a local process.

Both call worker/local_run.py, which runs the very run_jobs() the instance runs (package cache, the
package's own environment, its warm handler process, results and manifest), with files instead of S3.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from batchworker.errors import PermanentError

out = Console()
err = Console(stderr=True)


class RuntimeCheckFailed(PermanentError):
    """The package's handler failed on its own sample input."""


def add_parser(actions) -> None:
    """Add `job run` to the `job` subcommands (batchworker/cli/job_cmd.py)."""
    p = actions.add_parser(
        "run", help="run a package on local files exactly as the instance would (no cloud); same files + manifest"
    )
    p.add_argument("path", type=Path, metavar="PATH", help="the package folder (with job.toml)")
    p.add_argument("--input", dest="inputs", type=Path, nargs="+", required=True, metavar="FILE",
                   help="input files; each is one job, as one upload would be")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a job parameter")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="results go to DIR/jobs/<job_id>/ (results.csv, errors.jsonl, outputs/, manifest.json)")
    p.add_argument("--job-root", type=Path, default=None,
                   help="where package environments are cached (default ~/.cache/batchworker/job-run)")
    p.set_defaults(command=cmd_run)


def cmd_run(args) -> int:
    from batchworker.cli.job_cmd import check_static, parse_params
    from worker.local_run import run_local

    check_static(args.path)
    missing = [str(path) for path in args.inputs if not path.is_file()]
    if missing:
        err.print(f"[red]error:[/red] no such input file: {', '.join(missing)}")
        return 2
    manifests = run_local(args.path, args.inputs, args.out, parse_params(args.param), job_root=args.job_root)
    failed = 0
    for path, manifest in zip(args.inputs, manifests, strict=True):
        where = args.out / "jobs" / manifest["job_id"]
        counts = f"{manifest.get('items_succeeded', 0)}/{manifest['items']} items"
        if manifest["status"] == "succeeded":
            out.print(f"{path}: [green]succeeded[/green] ({counts}) -> {where}")
        else:
            failed += 1
            out.print(f"{path}: [red]failed[/red] ({counts}) -> {where}")
            err.print(f"  {manifest['error']}", markup=False, highlight=False)
    return 1 if failed else 0


def check_runtime(package_dir: Path, config) -> None:
    """Import the handler in the package's own environment and run setup + process on sample/."""
    from worker.local_run import SAMPLE_DIR, validate_runtime

    samples = Path(package_dir) / SAMPLE_DIR
    if not samples.is_dir():
        err.print(f"no {SAMPLE_DIR}/ folder: add sample inputs there so validate can run the handler on them")
        return
    err.print(f"running {config.name} on {SAMPLE_DIR}/ in its own environment (setup + process)...")
    problems = validate_runtime(package_dir)
    if problems:
        raise RuntimeCheckFailed("the handler failed on its sample input:\n" + "\n".join(problems))
    err.print(f"setup + process ok on every file in {SAMPLE_DIR}/")
