"""`batchworker-job prewarm`: at boot, become the job root's warm server with the default job set up already.

Started by the instance's systemd unit (Terraform user data) and, locally, by the instance host when the
instance turns running: while the control plane still waits for the transport, this process imports the
framework and prepares the default job (its package's handler process with setup() done; without a
package, torch and the model), so the first batch of a cold start runs warm.

Nothing runs twice or is lost when a batch arrives early: the server role (and socket) is taken before
anything slow, the first batch offered during the preparation is taken and runs right after it (later ones
by the warm server's usual rule, else launch starts a `run` of their own); whoever removes a batch's offer
token runs it (worker/server.py). When a `run` holds the role already, prewarm
exits at once. After `linger` seconds without a batch it exits, like any warm server.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

from worker import cli
from worker.errors import Interrupted
from worker.hosts import HostPool
from worker.paths import job_root_from_env
from worker.server import claim_role
from worker.spec import PackageRef

logger = logging.getLogger("batchworker.prewarm")
MAX_POINTER_BYTES = 1024 * 1024


def prewarm(job_root: Path, packages_uri: str | None, default_job: str | None, model_uri: str | None,
            linger_seconds: float) -> int:
    signal.signal(signal.SIGTERM, cli._on_sigterm)
    cli._raise_on_sigterm = False  # SIGTERM while preparing: stop afterwards, running what was taken
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
    server = cli._open_server(job_root, role, hosts)
    early = server.next_batch(0)
    try:
        from worker.runner import WarmState  # the slow imports start here
        from worker.storage import Storage

        warm = WarmState(hosts=hosts)
        try:
            warm.storage = Storage()
            ref = default_package(warm.storage, packages_uri, default_job) if default_job and packages_uri else None
            if ref is not None:
                hosts.expect([ref.version])  # while busy, the server still admits this package's batches
                from worker.package_run import prepare_package

                host = prepare_package(ref, job_root, warm.storage, hosts, logger)
                logger.info("default job %s ready: setup() done in %.2f s", ref.name, host.setup_s)
            elif model_uri:
                from worker.model import ModelCache
                from worker.runner import MODEL_CACHE_DIR

                warm.models = ModelCache(job_root / MODEL_CACHE_DIR)
                warm.models.get(model_uri, warm.storage)
                logger.info("model %s loaded", model_uri)
        except Exception:  # noqa: BLE001 - a job prepares what is missing itself and reports it
            logger.exception("preparing the default job failed; jobs will prepare it themselves")
        logger.info("warm after %.2f s; serving for %.0f s without a batch", time.monotonic() - started,
                    linger_seconds)
        linger = linger_seconds
        if early is not None:
            try:
                linger = cli._serve_batch(early, job_root, warm) or linger
            except Interrupted:  # SIGTERM: _serve below closes the server and runs what it took
                pass
        cli._serve(server, linger, job_root, warm)
    finally:
        hosts.close()
    return 0


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
    parser.add_argument("--model-uri", help="the model of the built-in job, when there is no default package")
    parser.add_argument("--linger-seconds", type=float, default=120.0,
                        help="serve this long without a batch, then exit (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return prewarm(job_root_from_env(), args.packages_uri, args.default_job, args.model_uri, args.linger_seconds)
