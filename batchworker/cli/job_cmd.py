"""`batchworker job validate | deploy | list | rollback`: job packages from the user's folder to the registry.

`job run` (the instance's runner in a local process) and the runtime half of `job validate` live in
batchworker/cli/job_run.py, beside the instance code they drive.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchworker.jobpkg.archive import MAX_UNPACKED_BYTES, package_files
from batchworker.jobpkg.config import NAME_PATTERN, JobConfig, load_job_config
from batchworker.jobpkg.errors import InvalidJobConfig, InvalidParams
from batchworker.jobpkg.registry import PackageRegistry

RUNTIME_MODULE = "batchworker.cli.job_run"

out = Console()
err = Console(stderr=True)


def add_parsers(sub, deployment_of) -> None:
    """Add `job ...` to the top-level subcommands; `deployment_of(args)` resolves the deployment."""
    job = sub.add_parser("job", help="job packages: validate, run, deploy, list, roll back")
    actions = job.add_subparsers(required=True, metavar="ACTION")

    p = actions.add_parser("validate", help="check a package folder: job.toml, files, then import + setup + sample")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--static", action="store_true", help="only job.toml and the files (no import, no setup)")
    p.set_defaults(command=cmd_validate)

    p = actions.add_parser("deploy", help="upload a package as a new immutable version and make it current")
    p.add_argument("path", type=Path, metavar="PATH")
    p.set_defaults(command=lambda args: cmd_deploy(args, deployment_of(args)))

    p = actions.add_parser("list", help="deployed packages: current version and when it was deployed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=lambda args: cmd_list(args, deployment_of(args)))

    p = actions.add_parser("rollback", help="make the version before the current one current again")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(command=lambda args: cmd_rollback(args, deployment_of(args)))

    if importlib.util.find_spec(RUNTIME_MODULE) is not None:
        importlib.import_module(RUNTIME_MODULE).add_parser(actions)


def registry_for(deployment) -> PackageRegistry:
    return PackageRegistry(deployment.require_artifacts_bucket(), deployment.client("s3"))


def check_static(path: Path) -> tuple[JobConfig, list[str]]:
    """job.toml and the files that would ship; raises a JobPackageError saying what to fix."""
    config = load_job_config(path)
    return config, package_files(path)


def cmd_validate(args) -> int:
    config, files = check_static(args.path)
    size = sum((args.path / name).stat().st_size for name in files)
    err.print(f"job.toml ok: job {config.name!r}, entrypoint {config.entrypoint}, accepts {', '.join(config.accept)}")
    err.print(f"{len(files)} files, {size} bytes to ship (limit {MAX_UNPACKED_BYTES})")
    for spec in config.params.values():
        default = "required" if spec.required else f"default {spec.default!r}"
        err.print(f"  param {spec.name}: {spec.type}, {default}" + (f"  {spec.description}" if spec.description else ""))
    if not args.static:
        if importlib.util.find_spec(RUNTIME_MODULE) is None:
            err.print("runtime check (import, setup, sample/) is not available in this version; static checks only")
        else:
            importlib.import_module(RUNTIME_MODULE).check_runtime(args.path, config)
    out.print(f"{args.path}: valid job package {config.name!r}")
    return 0


def cmd_deploy(args, deployment) -> int:
    registry = registry_for(deployment)
    check_static(args.path)  # refuse before touching the bucket
    result = registry.deploy(args.path)
    ref = result.ref
    if not result.changed:
        out.print(f"{ref.name}: version {ref.version[:12]} is already current; nothing changed")
        return 0
    was = f" (was {result.previous_version[:12]})" if result.previous_version else ""
    out.print(f"deployed {ref.name} version {ref.version[:12]}{was}: uploads under {ref.name}/ now run it")
    return 0


def cmd_list(args, deployment) -> int:
    refs = registry_for(deployment).list()
    if args.json:
        print(json.dumps([
            {"name": r.name, "version": r.version, "deployed_at": r.deployed_at or None, "source": r.source,
             "accept": list(r.config.accept), "params": {n: p.to_dict() for n, p in r.config.params.items()}}
            for r in refs
        ], indent=2))
        return 0
    if not refs:
        err.print("no job packages deployed; deploy one with `batchworker job deploy PATH`")
        return 0
    table = Table("NAME", "VERSION", "DEPLOYED", "ACCEPTS", "PARAMS")
    for ref in refs:
        when = ref.deployed_at or "bundled (terraform)"
        if ref.source == "rollback":
            when += " (rollback)"
        table.add_row(ref.name, ref.version[:12], when, " ".join(ref.config.accept), " ".join(ref.config.params))
    out.print(table)
    return 0


def cmd_rollback(args, deployment) -> int:
    result = registry_for(deployment).rollback(args.name)
    out.print(
        f"{args.name}: version {result.ref.version[:12]} is current again (was {result.previous_version[:12]}); "
        "jobs already accepted keep the version they were pinned to"
    )
    return 0


def parse_params(pairs: list[str]) -> dict[str, str]:
    """`--param k=v` texts -> {k: v} (typed by the trigger against the package's [params])."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidParams(f"--param {pair!r} must look like NAME=VALUE, e.g. --param top=3")
        params[name.strip().lower()] = value
    return params


def check_submission(deployment, job: str | None, params: dict[str, str], names: list[str]) -> None:
    """With --job, check the package is deployed and takes these files and parameters, before any upload."""
    if job is None:
        return  # the default job: its name is a deployment setting; the trigger checks the upload
    if not NAME_PATTERN.match(job):
        raise InvalidJobConfig(f"--job {job!r} is not a job package name (lowercase letters, digits, '-')")
    ref = registry_for(deployment).require(job)
    refused = [name for name in names if not ref.config.accepts(name)]
    if refused:
        raise InvalidParams(
            f"job {job!r} does not accept {', '.join(refused)} (it accepts {', '.join(ref.config.accept)})"
        )
    ref.config.resolve_params(params)
