"""Opt-in record of every AWS call a process makes (BATCHWORKER_CALL_LOG=<dir>), for the IAM check.

A botocore event hook writes one JSON line per call: who made it (`principal`), service, operation,
the parameters the IAM check needs to name the resource (never a body or a value), and the answer.
Standard library and botocore only: the local cloud loads it into Lambda handlers and instance jobs
through call_log_site/sitecustomize.py, so production code never imports it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

LOG_VARIABLE = "BATCHWORKER_CALL_LOG"
PRINCIPAL_VARIABLE = "BATCHWORKER_CALL_PRINCIPAL"
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "call_log_site")

# Parameters kept as they are: names of resources and the expressions that name attributes.
_KEPT = frozenset({
    "Bucket", "Prefix", "VersionId", "TableName", "IndexName", "InstanceIds", "Name", "Names", "Path",
    "FunctionName", "Qualifier", "InvocationType", "QueueUrl", "QueueName", "DocumentName", "CommandId",
    "InstanceId", "UpdateExpression", "ConditionExpression", "ProjectionExpression",
    "KeyConditionExpression", "FilterExpression", "ExpressionAttributeNames", "WithDecryption", "Type",
    "Overwrite", "ReturnValues", "Select", "AttributesToGet", "KeyId", "LogGroupName",
})
# Parameters whose names (not values) are kept: DynamoDB items, and the tables of a batch request.
_NAMES_ONLY = frozenset({"Item", "AttributeUpdates", "RequestItems"})
_lock = threading.Lock()


def _params(service: str, params: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name, value in params.items():
        if name == "Key":  # an S3 key is a string; a DynamoDB key is a map of attribute names
            kept[name] = value if isinstance(value, str) else sorted(value)
        elif name in _NAMES_ONLY and isinstance(value, dict):
            kept[name] = sorted(value)
        elif name in _KEPT:
            kept[name] = value
        elif name == "Entries" and service == "sqs":
            kept["EntryCount"] = len(value)
    return kept


def _response_facts(operation: str, parsed: dict[str, Any]) -> dict[str, Any]:
    if operation == "GetParameter":
        return {"ParameterType": (parsed.get("Parameter") or {}).get("Type")}
    return {}


class Recorder:
    """The hook: register(events) on a botocore event emitter; every call then appends a line."""

    def __init__(self, log_dir: str, principal: str, skip: frozenset[str] = frozenset()) -> None:
        self.path = os.path.join(log_dir, f"calls-{os.getpid()}-{id(self):x}.jsonl")
        self.principal = principal
        self.skip = skip
        os.makedirs(log_dir, exist_ok=True)

    def register(self, events: Any) -> None:
        events.register("before-parameter-build", self._before_parameters, unique_id=f"bw-call-log-p-{id(self)}")
        events.register("before-call", self._before_call, unique_id=f"bw-call-log-b-{id(self)}")
        events.register("after-call", self._after_call, unique_id=f"bw-call-log-a-{id(self)}")
        events.register("after-call-error", self._after_error, unique_id=f"bw-call-log-e-{id(self)}")

    def _before_parameters(self, params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        context["bw_call_params"] = _params(model.service_model.service_name, params)
        context["bw_call_model"] = model

    def _before_call(self, model: Any, context: dict[str, Any], request_signer: Any = None, **_: Any) -> None:
        context["bw_call_region"] = getattr(request_signer, "region_name", None)

    def _after_call(self, http_response: Any, parsed: dict[str, Any], model: Any, context: dict[str, Any],
                    **_: Any) -> None:
        code = (parsed.get("Error") or {}).get("Code")
        self._write(model, context, "ok" if code is None else str(code), http_response.status_code,
                    _response_facts(model.name, parsed) if code is None else {})

    def _after_error(self, exception: BaseException, context: Any = None, **_: Any) -> None:
        model = (context or {}).get("bw_call_model")
        if model is not None:
            self._write(model, context, f"exception:{type(exception).__name__}", None, {})

    def _write(self, model: Any, context: dict[str, Any], result: str, status: int | None,
               facts: dict[str, Any]) -> None:
        if model.name in self.skip:
            return
        record = {
            "at": time.time(), "principal": self.principal, "service": model.service_model.service_name,
            "signing_name": model.service_model.signing_name, "operation": model.name,
            "region": context.get("bw_call_region"), "params": context.get("bw_call_params", {}),
            "result": result, "http_status": status, **({"response": facts} if facts else {}),
        }
        line = json.dumps(record, default=str) + "\n"
        with _lock, open(self.path, "a", encoding="utf-8") as log:
            log.write(line)


def record_session(session: Any, principal: str, skip: frozenset[str] = frozenset()) -> bool:
    """Record the calls of clients made from `session` (boto3 or botocore) from now on, when the log is on."""
    log_dir = os.environ.get(LOG_VARIABLE)
    if not log_dir:
        return False
    botocore_session = getattr(session, "_session", session)
    Recorder(log_dir, principal, skip).register(botocore_session.get_component("event_emitter"))
    return True


def install_from_env() -> bool:
    """Record every botocore session of this process under BATCHWORKER_CALL_PRINCIPAL (sitecustomize)."""
    log_dir, principal = os.environ.get(LOG_VARIABLE), os.environ.get(PRINCIPAL_VARIABLE)
    if not log_dir or not principal:
        return False
    import botocore.session

    original_init = botocore.session.Session.__init__
    if getattr(original_init, "bw_call_log", False):
        return True

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        Recorder(log_dir, principal).register(self.get_component("event_emitter"))

    init.bw_call_log = True  # type: ignore[attr-defined]
    botocore.session.Session.__init__ = init
    return True


def child_environment(env: dict[str, str], principal: str) -> dict[str, str]:
    """`env` plus what a child process needs to record its calls as `principal` (unchanged when off)."""
    log_dir = env.get(LOG_VARIABLE) or os.environ.get(LOG_VARIABLE)
    if not log_dir:
        return env
    python_path = [SITE_DIR, *filter(None, [env.get("PYTHONPATH")])]
    return {**env, LOG_VARIABLE: log_dir, PRINCIPAL_VARIABLE: principal, "PYTHONPATH": os.pathsep.join(python_path)}
