"""Subprocess side of the local Lambda runtime: imports one handler, then serves invocations over a pipe.

Started as `python -P lambda_bootstrap.py <module.function>` with cwd and PYTHONPATH at the extracted code.
Standard library only: the handler's code, not this file, decides which `batchworker` gets imported.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO

# Protocol, one JSON object per line:
#   child -> parent once:   {"ready": true} or {"ready": false, "errorType": ..., "errorMessage": ...}
#   parent -> child:        {"request_id", "payload": "<event JSON>", "deadline_ms": <epoch ms>, "invoked_function_arn"}
#   child -> parent:        {"ok": true, "payload": "<result JSON>"} or {"ok": false, "error": {...}}


class LambdaContext:
    """The attributes of the real Python runtime's context object that handlers and Powertools read."""

    def __init__(self, request_id: str, deadline_ms: int, invoked_function_arn: str) -> None:
        self.function_name = os.environ["AWS_LAMBDA_FUNCTION_NAME"]
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.invoked_function_arn = invoked_function_arn
        self.memory_limit_in_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
        self.aws_request_id = request_id
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity = None
        self.client_context = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


def _error(error_type: str, message: str, exc: BaseException | None = None) -> dict[str, Any]:
    stack = traceback.format_tb(exc.__traceback__) if exc is not None else []
    return {"errorMessage": message, "errorType": error_type, "requestId": "", "stackTrace": stack}


def load_handler(spec: str) -> tuple[Any, dict[str, Any] | None]:
    """Import `module.function` the way the python3.11 runtime does; return (handler, None) or (None, error)."""
    module_name, _, function_name = spec.rpartition(".")
    if not module_name or not function_name:
        return None, _error(
            "Runtime.MalformedHandlerName", f"Bad handler '{spec}': not enough values to unpack"
        )
    try:
        module = importlib.import_module(module_name.replace("/", "."))
    except Exception as exc:  # noqa: BLE001 - any import failure is the function's init error
        traceback.print_exc()
        return None, _error(
            "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}", exc
        )
    handler = getattr(module, function_name, None)
    if handler is None:
        return None, _error(
            "Runtime.HandlerNotFound", f"Handler '{function_name}' missing on module '{module_name}'"
        )
    return handler, None


def _invoke(handler: Any, request: dict[str, Any]) -> dict[str, Any]:
    request_id = request["request_id"]
    started = time.monotonic()
    sys.stderr.write(f"START RequestId: {request_id} Version: $LATEST\n")
    try:
        event = json.loads(request["payload"])
        result = handler(
            event, LambdaContext(request_id, request["deadline_ms"], request["invoked_function_arn"])
        )
        try:
            response: dict[str, Any] = {"ok": True, "payload": json.dumps(result)}
        except (TypeError, ValueError) as exc:
            response = {
                "ok": False,
                "error": _error("Runtime.MarshalError", f"Unable to marshal response: {exc}"),
            }
    except Exception as exc:  # noqa: BLE001 - an unhandled handler error is reported, as Lambda does
        error = _error(type(exc).__name__, str(exc), exc)
        error["requestId"] = request_id
        sys.stderr.write(f"[ERROR] {type(exc).__name__}: {exc}\n{''.join(traceback.format_exc())}")
        response = {"ok": False, "error": error}
    duration_ms = (time.monotonic() - started) * 1000
    sys.stdout.flush()
    sys.stderr.write(
        f"END RequestId: {request_id}\nREPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\n"
    )
    sys.stderr.flush()
    return response


def _exit_when_orphaned(parent_pid: int) -> None:
    """A runtime killed with SIGKILL cannot kill us: leave on our own, even in the middle of a handler."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _take_protocol_streams() -> tuple[TextIO, TextIO]:
    """Keep stdin/stdout for the protocol; point fds 0/1 at /dev/null and the log, so prints reach the log."""
    protocol_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return protocol_in, protocol_out


def _send(stream: TextIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def main() -> None:
    protocol_in, protocol_out = _take_protocol_streams()
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    # The real runtime installs one root handler; its level follows AWS_LAMBDA_LOG_LEVEL (default WARNING).
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("AWS_LAMBDA_LOG_LEVEL", "WARNING").upper(),
        format="[%(levelname)s]\t%(asctime)s\t%(name)s\t%(message)s",
    )
    handler, init_error = load_handler(sys.argv[1])
    if init_error is not None:
        _send(protocol_out, {"ready": False, **init_error})
        return
    _send(protocol_out, {"ready": True})
    for line in protocol_in:
        _send(protocol_out, _invoke(handler, json.loads(line)))


if __name__ == "__main__":
    main()
