"""`batchworker-job prewarm`: at boot, become the job root's warm server with the default job set up already.

Started by the instance's systemd unit (Terraform user data) and, locally, by the instance host when the
instance turns running: while the control plane still waits for the transport, this process imports the
framework and prepares the job packages of the jobs that started the instance (the trigger names them on
the instance's ledger item) and the default job (each package's handler process with setup() done), so the first batch of a cold start runs warm. The handler
processes the previous pre-warm on this disk set up are started first thing (start_remembered), so their
imports and setup() overlap this process's own.

Nothing runs twice or is lost when a batch arrives early: the server role (and socket) is taken before
anything slow, the first batch offered during the preparation is taken and runs right after it (later ones
by the warm server's usual rule, else launch starts a `run` of their own); whoever removes a batch's offer
token runs it (worker/server.py). When a `run` holds the role already, prewarm
exits at once. After `linger` seconds without a batch it exits, like any warm server (both serve through
worker/serving.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from worker.errors import Interrupted
from worker.hosts import HANDLER_LOG_NAME, HandlerHost, HostKey, HostPool
from worker.paths import job_root_from_env
from worker.server import Offered, claim_role
from worker.serving import BatchProcess
from worker.spec import PackageRef

logger = logging.getLogger("batchworker.prewarm")
MAX_POINTER_BYTES = 1024 * 1024
LEDGER_SORT_KEY = "~ledger"  # the instance's ledger item (batchworker/ledger.py, not installed here)
PREWARM_ATTRIBUTE = "prewarm"
PACKAGE_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")
VERSION = re.compile(r"[0-9a-f]{64}")
INSTANCE_ID_ENV = "BATCHWORKER_INSTANCE_ID"  # as worker/runner.py (imported later: it is slow)
REMEMBERED_NAME = ".prewarm-hosts.json"  # in the job root: the handlers the last pre-warm set up
MAX_REMEMBERED = 4


def prewarm(job_root: Path, packages_uri: str | None, default_job: str | None, linger_seconds: float,
            instance_events_table: str | None = None, instance_id: str | None = None) -> int:
    process = BatchProcess(job_root, idle=True)  # SIGTERM while preparing: stop afterwards, running what was taken
    job_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    role = claim_role(job_root)
    if role is None:
        logger.info("a warm server runs already (a job came first): nothing to prepare")
        return 0
    started = time.monotonic()
    hosts = HostPool()
    # Serve at once (launch waits at most 2 s for an answer), idle: the first batch offered is taken while
    # this process prepares, and waits for the preparation a new `run` would have to do anyway. A batch the
    # server took before it was made idle comes back from next_batch: it runs first.
    server = process.open_server(role, hosts)
    early = server.next_batch(0)
    # The handler processes this job root's last pre-warm set up start now, before this process's own slow
    # imports and reads: their framework imports and setup() overlap them. Kept if still wanted.
    remembered = start_remembered(job_root)
    try:
        import batchworker.jobpkg  # noqa: F401 - the first job reads its job.toml with it (10-40 ms, else on its path)
        from worker.lease import shared_client  # the slow imports start here
        from worker.runner import WarmState
        from worker.storage import Storage

        warm = WarmState(hosts=hosts)
        starters: list[PackageRef] = []
        default: PackageRef | None = None
        try:
            warm.storage = Storage()
            # The client the server's listener renews taken jobs' leases with: made now, not while the
            # first job waits for its hand-over (a session and a service model load).
            shared_client()
            if packages_uri and instance_events_table and instance_id:
                starters = started_by(instance_events_table, instance_id, packages_uri)
            if default_job and packages_uri and default_job not in {ref.name for ref in starters}:
                # (a default-job upload started the instance: its record pins the version, no pointer read)
                default = default_package(warm.storage, packages_uri, default_job)
            # While busy, the server still admits these packages' batches (they will find them warm)
            hosts.expect([ref.version for ref in [*starters, *([default] if default else [])]])
        except Exception:  # noqa: BLE001 - a job prepares what is missing itself and reports it
            logger.exception("reading which job packages to prepare failed; jobs will prepare them themselves")
        # The packages of the jobs that started this instance first: one of them is on its way (it is most
        # likely the early batch, which then runs before the default job is prepared).
        _prepare(starters, job_root, warm, remembered, "started this instance")
        linger = linger_seconds
        if starters:  # what the server took meanwhile (most likely that job) runs now, before the default job
            taken, early = early if early is not None else server.next_batch(0), None
            while taken is not None and not process.terminating:
                linger = _serve_early(process, taken, warm, linger)
                taken = server.next_batch(0)
            if taken is not None:  # SIGTERM: serve() runs it as it closes the server
                early = taken
        if default is not None and default.version not in {ref.version for ref in starters}:
            _prepare([default], job_root, warm, remembered, "the default job")
        _discard(remembered)  # started for packages no longer wanted
        remember(job_root, hosts)
        logger.info("warm after %.2f s; serving for %.0f s without a batch", time.monotonic() - started,
                    linger_seconds)
        if early is not None:
            linger = _serve_early(process, early, warm, linger)
        process.serve(server, linger, warm)
    finally:
        _discard(remembered)
        hosts.close()
    return 0


def _prepare(refs: list[PackageRef], job_root: Path, warm, remembered: dict[str, tuple[HostKey, HandlerHost]],
             why: str) -> None:
    """Each package's archive, environment and handler process (setup() done), one after another; a handler
    process started at boot for its version (start_remembered) is used once its setup() is done."""
    from worker.package_run import prepare_package

    for ref in refs:
        early_start = remembered.pop(ref.version, None)
        try:
            if early_start is not None and _ready(*early_start):
                key, host = early_start
                warm.hosts.add(key, host)
            else:
                key, host = prepare_package(ref, job_root, warm.storage, warm.hosts, logger)
        except Exception:  # noqa: BLE001 - its job prepares it itself and reports what fails
            logger.exception("preparing job package %s (%s) failed; its jobs will prepare it themselves",
                             ref.name, why)
            continue
        logger.info("job package %s %s (%s) ready: setup() done in %.2f s, handler pid %d", ref.name,
                    ref.version[:12], why, host.setup_s, host.pid)


def start_remembered(job_root: Path) -> dict[str, tuple[HostKey, HandlerHost]]:
    """Start the handler processes of the packages the last pre-warm on this job root set up (REMEMBERED_NAME:
    package folder, environment's Python, entrypoint; the folders are content-addressed, never changed).
    By version; nothing when there is no record or its folders are gone."""
    try:
        records = json.loads((job_root / REMEMBERED_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    started: dict[str, tuple[HostKey, HandlerHost]] = {}
    for record in records[:MAX_REMEMBERED] if isinstance(records, list) else ():
        try:
            key = HostKey(record["version"], record["environment_key"])
            package_dir, python = Path(record["package_dir"]), record["python"]
            if not (VERSION.fullmatch(key.package_version) and package_dir.is_dir() and Path(python).is_file()):
                continue
            started[key.package_version] = key, HandlerHost(python, package_dir, record["entrypoint"],
                                                            job_root / HANDLER_LOG_NAME)
        except (KeyError, TypeError, OSError) as exc:
            logger.warning("not starting a remembered handler early: %s", exc)
    return started


def remember(job_root: Path, hosts: HostPool) -> None:
    """What start_remembered starts at the next boot: the handler processes set up now."""
    records = [{"version": key.package_version, "environment_key": key.environment_key, "python": host.python,
                "package_dir": str(host.package_dir), "entrypoint": host.entrypoint}
               for key, host in hosts.items()][:MAX_REMEMBERED]
    try:
        tmp = job_root / f".{REMEMBERED_NAME}.tmp"
        tmp.write_text(json.dumps(records), encoding="utf-8")
        os.replace(tmp, job_root / REMEMBERED_NAME)
    except OSError as exc:
        logger.warning("could not record the prepared packages for the next boot: %s", exc)


def _ready(key: HostKey, host: HandlerHost) -> bool:
    try:
        host.wait_ready(lambda level, message: logger.info("handler: %s", message))
    except Exception as exc:  # noqa: BLE001 - prepared the usual way instead, which reports the failure
        logger.warning("the handler started early for %s is not usable (%s); preparing it again",
                       key.package_version[:12], exc)
        host.kill()
        return False
    return True


def _discard(remembered: dict[str, tuple[HostKey, HandlerHost]]) -> None:
    while remembered:
        _, (_, host) = remembered.popitem()
        host.kill()


def _serve_early(process: BatchProcess, batch: Offered, warm, linger: float) -> float:
    """The batch the server took while this process prepared: it runs now, exactly once."""
    try:
        return process.serve_batch(batch, warm) or linger
    except Interrupted:  # SIGTERM: serve() closes the server and runs what it took
        return linger


def started_by(table: str, instance_id: str, packages_uri: str) -> list[PackageRef]:
    """The job packages (pinned versions) of the jobs that started this instance: the trigger writes them
    on the instance's ledger item (batchworker/ledger.py `prewarm`) when it starts it. The instance role may
    read that attribute only."""
    from worker.lease import make_client

    item = make_client().get_item(
        TableName=table, Key={"instance_id": {"S": instance_id}, "at": {"S": LEDGER_SORT_KEY}},
        ProjectionExpression=PREWARM_ATTRIBUTE, ConsistentRead=True,
    ).get("Item", {})
    bucket, _, prefix = packages_uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    refs = []
    for name, value in sorted(item.get(PREWARM_ATTRIBUTE, {}).get("M", {}).items()):
        version = value.get("S", "") if isinstance(value, dict) else ""
        if not (PACKAGE_NAME.fullmatch(name) and VERSION.fullmatch(version)):
            logger.warning("ignoring a malformed pre-warm entry %r: %r", name[:60], version[:80])
            continue
        refs.append(PackageRef(name, version, f"s3://{bucket}/{prefix}{name}/{version}.tar.gz"))
    logger.info("started for job packages: %s", ", ".join(f"{r.name} {r.version[:12]}" for r in refs) or "none")
    return refs


def default_package(storage, packages_uri: str, name: str) -> PackageRef | None:
    """The default job's current version: its deploy pointer, else Terraform's bundled version."""
    bucket, _, prefix = packages_uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    pointer = _read_json(storage, bucket, f"{prefix}{name}/current.json")
    if pointer:
        return PackageRef(name, pointer["version"], pointer["uri"])
    bundled = _read_json(storage, bucket, f"{prefix}{name}/bundled.json")
    if bundled:
        return PackageRef(name, bundled["version"], f"s3://{bucket}/{prefix}{name}/{bundled['version']}.tar.gz")
    logger.warning("no deployed or bundled version of %s under %s", name, packages_uri)
    return None


def _read_json(storage, bucket: str, key: str) -> dict | None:
    body = storage.get_optional(bucket, key, MAX_POINTER_BYTES)
    return json.loads(body) if body else None


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="batchworker-job prewarm", description=__doc__.splitlines()[0])
    parser.add_argument("--packages-uri", help="s3://<artifacts bucket>/job-packages/")
    parser.add_argument("--default-job", help="name of the default job package")
    parser.add_argument("--linger-seconds", type=float, default=120.0,
                        help="serve this long without a batch, then exit (default 120)")
    parser.add_argument("--instance-events-table",
                        help="the table of the instances' ledger, where the trigger names the packages that started it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return prewarm(job_root_from_env(), args.packages_uri, args.default_job, args.linger_seconds,
                   args.instance_events_table, os.environ.get(INSTANCE_ID_ENV))
