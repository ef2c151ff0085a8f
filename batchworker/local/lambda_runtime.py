"""The local Lambda runtime: runs the functions deployed to moto from the build zips, like `sam local`.

It reads functions, SQS event source mappings and `rate(...)` schedules from moto, runs each handler in
warm subprocesses, serves the Invoke API for boto3 and polls the mapped queues. The CLI
`python -m batchworker.local.lambda_runtime --code-dir build/lambdas --state-dir DIR` wraps LocalLambdaRuntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import boto3
from botocore.exceptions import ClientError

from batchworker.errors import BatchworkerError, ConfigurationError
from batchworker.local import call_log
from batchworker.local.lambda_invoke_api import InvokeApiServer
from batchworker.local.lambda_pool import FunctionPool, FunctionSpec, InvocationResult, PoolClosed
from batchworker.local.lambda_scheduler import Scheduler, discover_scheduled_targets
from batchworker.local.sqs_poller import SqsMapping, SqsPoller

logger = logging.getLogger(__name__)

READY_FILE = "lambda-runtime.json"
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_ASYNC_RETRY_DELAYS_SECONDS = (1.0, 2.0)  # Lambda retries async invokes twice (after ~1 and ~2 min)


class FunctionNotFound(BatchworkerError):
    """No function of that name is deployed (or its zip is missing from the code dir)."""


def zip_name_for(function_name: str) -> str:
    """`batchworker-trigger` -> `trigger.zip`: the last `-` component of the function name."""
    return function_name.rsplit("-", 1)[-1] + ".zip"


def extract_code(zip_path: Path, target: Path) -> Path:
    """Unpack a function's zip into a fresh `target` directory."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target)
    return target


class LocalLambdaRuntime:
    """Functions from moto, run locally: `start()`, then `invoke_url` for boto3, then `stop()`."""

    def __init__(
        self,
        code_dir: str | Path,
        state_dir: str | Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        port: int = 0,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        schedule_speedup: float = 1.0,
        async_retry_delays_seconds: Sequence[float] = DEFAULT_ASYNC_RETRY_DELAYS_SECONDS,
        stop_grace_seconds: float = 5.0,
        session: boto3.session.Session | None = None,
    ) -> None:
        self.code_dir = Path(code_dir).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if not self.endpoint_url:
            raise ConfigurationError(
                "AWS_ENDPOINT_URL is not set: point it at the moto server of the local cloud"
            )
        if schedule_speedup <= 0:
            raise ConfigurationError(f"schedule_speedup must be positive, not {schedule_speedup}")
        self._session = session or boto3.session.Session(region_name=region)
        if not self._session.region_name:
            raise ConfigurationError("no AWS region: set AWS_DEFAULT_REGION (any region; moto accepts all)")
        self.region: str = self._session.region_name
        self._port = port
        self._max_concurrency = max_concurrency
        self._schedule_speedup = schedule_speedup
        self._async_retry_delays = tuple(async_retry_delays_seconds)
        self._stop_grace_seconds = stop_grace_seconds
        self._stop = threading.Event()
        self._pools: dict[str, FunctionPool] = {}
        self._threads: list[threading.Thread] = []
        self._async_threads: set[threading.Thread] = set()
        self._async_lock = threading.Lock()
        self._api: InvokeApiServer | None = None
        self._sqs: Any = None  # one client for every poller: creating clients is not thread-safe
        self.pollers: list[SqsPoller] = []
        self.schedulers: list[Scheduler] = []

    # -- public API ------------------------------------------------------------------------------------

    @property
    def invoke_url(self) -> str:
        if self._api is None:
            raise BatchworkerError("the local Lambda runtime is not started")
        return self._api.url

    @property
    def functions(self) -> list[str]:
        return sorted(self._pools)

    @property
    def ready_file(self) -> Path:
        return self.state_dir / READY_FILE

    def start(self) -> Self:
        """Discover, extract, serve and poll; the ready file is written last. Cleans up when it fails."""
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._api = InvokeApiServer(self, port=self._port)
        self._sqs = self._client("sqs")
        try:
            for spec in self._discover_functions():
                env = self._function_environment(spec)
                log_path = self.state_dir / "logs" / f"{spec.name}.log"
                self._pools[spec.name] = FunctionPool(spec, env, log_path, self._max_concurrency)
            self._api.start()
            self._start_pollers()
            self._start_schedulers()
            self._write_ready_file()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "local Lambda runtime ready at %s with %s", self.invoke_url, ", ".join(self.functions) or "none"
        )
        return self

    def stop(self) -> None:
        """Stop polling and scheduling, let in-flight invocations finish briefly, then kill every handler."""
        self._stop.set()
        if self._api is not None:
            self._api.stop()
        deadline = time.monotonic() + self._stop_grace_seconds
        for thread in [*self._threads, *self._async_snapshot()]:
            thread.join(max(0.0, deadline - time.monotonic()))
        for pool in self._pools.values():
            pool.close()
        for thread in [*self._threads, *self._async_snapshot()]:
            thread.join(2.0)
        self.ready_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def has_function(self, name: str) -> bool:
        return name in self._pools

    def invoke_sync(self, name: str, payload: str) -> InvocationResult:
        """Run `name` on `payload` (event JSON text) and wait for the result, as RequestResponse does."""
        return self._pool(name).invoke(payload)

    def invoke_async(self, name: str, payload: str) -> None:
        """Queue an `Event` invocation: run in the background, retried on error as Lambda does."""
        self._pool(name)
        thread = threading.Thread(
            target=self._run_async, args=(name, payload), name=f"async-{name}", daemon=True
        )
        with self._async_lock:
            self._async_threads.add(thread)
        thread.start()

    def handler_pids(self) -> list[int]:
        return [pid for pool in self._pools.values() for pid in pool.pids()]

    # -- discovery ------------------------------------------------------------------------------------

    def _client(self, service: str) -> Any:
        return self._session.client(service, endpoint_url=self.endpoint_url)

    def _discover_functions(self) -> list[FunctionSpec]:
        lambda_client = self._client("lambda")
        specs = []
        for page in lambda_client.get_paginator("list_functions").paginate():
            for listed in page["Functions"]:
                config = lambda_client.get_function_configuration(FunctionName=listed["FunctionName"])
                name = config["FunctionName"]
                zip_path = self.code_dir / zip_name_for(name)
                if not zip_path.is_file():
                    logger.warning("function %s is not run locally: %s does not exist", name, zip_path)
                    continue
                specs.append(
                    FunctionSpec(
                        name=name,
                        arn=config["FunctionArn"],
                        handler=config["Handler"],
                        code_dir=extract_code(zip_path, self.state_dir / "code" / name),
                        timeout_seconds=int(config.get("Timeout") or 3),
                        memory_mb=int(config.get("MemorySize") or 128),
                        environment=dict((config.get("Environment") or {}).get("Variables") or {}),
                    )
                )
        return specs

    def _function_environment(self, spec: FunctionSpec) -> dict[str, str]:
        """What Lambda sets, plus the local endpoints; the host's environment does not leak in."""
        credentials = self._session.get_credentials()
        if credentials is None:
            raise ConfigurationError(
                "no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (fake is fine)"
            )
        frozen = credentials.get_frozen_credentials()
        python_path = [str(spec.code_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            **spec.environment,
            "PYTHONPATH": os.pathsep.join(python_path),
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_LAMBDA": self.invoke_url,
            "AWS_ACCESS_KEY_ID": frozen.access_key,
            "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.11",
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(spec.timeout_seconds),
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": "local",
            "LAMBDA_TASK_ROOT": str(spec.code_dir),
            "_HANDLER": spec.handler,
            # Names the function in the User-Agent of its AWS calls: the recorded calls per job are told apart
            # by component (batchworker.costs.load, `scripts/record_calls.py`), and the emulators' own left out.
            "AWS_SDK_UA_APP_ID": spec.name,
        }
        if frozen.token:
            env["AWS_SESSION_TOKEN"] = frozen.token
        return call_log.child_environment(env, f"lambda:{spec.name}")

    def _poller_sqs(self, mapping: SqsMapping) -> Any:
        """The shared client, or with the call log on, one recording under the function (Lambda polls with its role).

        GetQueueUrl is not recorded: Lambda's poller uses the queue ARN, only this local one looks the URL up.
        """
        session = boto3.session.Session(region_name=self.region)
        if call_log.record_session(session, f"lambda:{mapping.function_name}", skip=frozenset({"GetQueueUrl"})):
            return session.client("sqs", endpoint_url=self.endpoint_url)
        return self._sqs

    def _start_pollers(self) -> None:
        lambda_client = self._client("lambda")
        for page in lambda_client.get_paginator("list_event_source_mappings").paginate():
            for raw in page["EventSourceMappings"]:
                if not raw["EventSourceArn"].startswith("arn:aws:sqs:"):
                    logger.warning("event source %s is not polled locally (only SQS)", raw["EventSourceArn"])
                    continue
                mapping = SqsMapping.from_api(raw)
                if mapping.function_name not in self._pools:
                    logger.warning(
                        "mapping %s targets %s, which is not run locally", mapping.uuid, mapping.function_name
                    )
                    continue
                pool = self._pools[mapping.function_name]
                try:
                    self.pollers.append(SqsPoller(mapping, self._poller_sqs(mapping), pool.invoke, self._stop))
                except ClientError as exc:
                    logger.warning("mapping %s is not polled: %s", mapping.uuid, exc)
        for poller in self.pollers:
            poller.start()
        self._threads += self.pollers

    def _start_schedulers(self) -> None:
        for target in discover_scheduled_targets(self._client("events")):
            if target.function_name in self._pools:
                self.schedulers.append(
                    Scheduler(target, self._schedule_speedup, self.invoke_async, self._stop)
                )
        for scheduler in self.schedulers:
            scheduler.start()
        self._threads += self.schedulers

    def _write_ready_file(self) -> None:
        ready = {
            "invoke_url": self.invoke_url,
            "pid": os.getpid(),
            "functions": self.functions,
            "event_source_mappings": [
                {
                    "uuid": p.mapping.uuid,
                    "queue_arn": p.mapping.queue_arn,
                    "function": p.mapping.function_name,
                }
                for p in self.pollers
            ],
            "schedules": [
                {
                    "rule": s.target.rule_name,
                    "function": s.target.function_name,
                    "period_seconds": s.target.period_seconds,
                }
                for s in self.schedulers
            ],
        }
        partial = self.ready_file.with_suffix(".json.tmp")
        partial.write_text(json.dumps(ready, indent=2) + "\n")
        partial.replace(self.ready_file)

    # -- invocation -----------------------------------------------------------------------------------

    def _pool(self, name: str) -> FunctionPool:
        try:
            return self._pools[name]
        except KeyError:
            raise FunctionNotFound(
                f"function {name} is not deployed or has no zip in {self.code_dir}"
            ) from None

    def _run_async(self, name: str, payload: str) -> None:
        """One async event: up to 1 + len(retry delays) attempts; then dropped (moto keeps no DeadLetterConfig)."""
        pool = self._pools[name]
        try:
            for attempt, delay in enumerate([*self._async_retry_delays, None], start=1):
                result = pool.invoke(payload)
                if not result.is_error:
                    return
                logger.warning("async %s attempt %d failed: %s", name, attempt, result.error_type)
                if delay is None:
                    logger.error(
                        "async %s dropped after %d attempts: %s", name, attempt, result.error_message
                    )
                    return
                if self._stop.wait(delay):
                    raise PoolClosed("stopping")
        except PoolClosed:
            logger.warning("async invocation of %s dropped: the runtime is stopping", name)
        finally:
            with self._async_lock:
                self._async_threads.discard(threading.current_thread())

    def _async_snapshot(self) -> list[threading.Thread]:
        with self._async_lock:
            return list(self._async_threads)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m batchworker.local.lambda_runtime",
        description="Run the Lambda functions deployed to the moto server at AWS_ENDPOINT_URL.",
    )
    parser.add_argument("--code-dir", required=True, type=Path, help="folder of <name>.zip build outputs")
    parser.add_argument(
        "--state-dir", required=True, type=Path, help="extracted code, logs and the ready file"
    )
    parser.add_argument("--port", type=int, default=0, help="Invoke API port on 127.0.0.1 (0: a free one)")
    parser.add_argument(
        "--schedule-speedup", type=float, default=1.0, help="run rate() schedules N times faster"
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY, help="processes per function"
    )
    parser.add_argument(
        "--async-retry-delay-seconds",
        type=float,
        default=DEFAULT_ASYNC_RETRY_DELAYS_SECONDS[0],
        help="delay before the first retry of a failed async invoke (the second waits twice as long)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        runtime = LocalLambdaRuntime(
            args.code_dir,
            args.state_dir,
            port=args.port,
            max_concurrency=args.max_concurrency,
            schedule_speedup=args.schedule_speedup,
            async_retry_delays_seconds=(args.async_retry_delay_seconds, 2 * args.async_retry_delay_seconds),
        )
    except BatchworkerError as exc:
        logger.error("%s", exc)
        return 2
    try:
        runtime.start()
    except BatchworkerError as exc:
        logger.error("%s", exc)
        return 2
    try:
        while not stop_requested.wait(1.0):
            pass
    finally:
        logger.info("stopping the local Lambda runtime")
        runtime.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
