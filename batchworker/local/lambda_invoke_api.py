"""The Lambda Invoke API (`POST /2015-03-31/functions/{name}/invocations`) served on 127.0.0.1 for boto3."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import unquote, urlsplit

from batchworker.local.lambda_pool import InvocationResult, PoolClosed

logger = logging.getLogger(__name__)

_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<function>[^/]+)/invocations$")
MAX_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_ASYNC_PAYLOAD_BYTES = 256 * 1024


def function_name_of(identifier: str) -> str:
    """Name from a function name, `name:qualifier`, a partial ARN or a full ARN."""
    parts = identifier.split(":")
    if identifier.startswith("arn:"):
        return parts[6]
    if len(parts) >= 3 and parts[1] == "function":  # 123456789012:function:name[:qualifier]
        return parts[2]
    return parts[0]


class InvokeBackend(Protocol):
    """What the API needs from the runtime; LocalLambdaRuntime implements it."""

    def has_function(self, name: str) -> bool: ...

    def invoke_sync(self, name: str, payload: str) -> InvocationResult: ...

    def invoke_async(self, name: str, payload: str) -> None: ...


def _make_handler(backend: InvokeBackend) -> type[BaseHTTPRequestHandler]:
    class InvokeHandler(BaseHTTPRequestHandler):
        server_version = "batchworker-local-lambda"

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("invoke api: " + format, *args)

        def do_POST(self) -> None:  # stdlib naming
            request_id = str(uuid.uuid4())
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            match = _INVOKE_PATH.match(urlsplit(self.path).path)
            if match is None:
                self._error(
                    404, "UnknownOperationException", f"No local route for POST {self.path}", request_id
                )
                return
            name = function_name_of(unquote(match["function"]))
            if not backend.has_function(name):
                self._error(404, "ResourceNotFoundException", f"Function not found: {name}", request_id)
                return
            invocation_type = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
            limit = MAX_ASYNC_PAYLOAD_BYTES if invocation_type == "Event" else MAX_SYNC_PAYLOAD_BYTES
            if len(body) > limit:
                message = f"{len(body)} byte payload is too large for the {invocation_type} invocation type"
                self._error(413, "RequestTooLargeException", message, request_id)
                return
            payload = body.decode() if body else "{}"
            try:
                json.loads(payload)
            except ValueError:
                self._error(
                    400,
                    "InvalidRequestContentException",
                    "Could not parse request body into json",
                    request_id,
                )
                return
            if invocation_type == "DryRun":
                self._respond(204, b"", request_id)
            elif invocation_type == "Event":
                backend.invoke_async(name, payload)
                self._respond(202, b"", request_id)
            elif invocation_type == "RequestResponse":
                self._invoke_sync(name, payload, request_id)
            else:
                self._error(
                    400,
                    "InvalidParameterValueException",
                    f"bad invocation type {invocation_type}",
                    request_id,
                )

        def _invoke_sync(self, name: str, payload: str, request_id: str) -> None:
            try:
                result = backend.invoke_sync(name, payload)
            except PoolClosed as exc:
                self._error(503, "ServiceException", str(exc), request_id)
                return
            if result.is_error:
                self._respond(
                    200, result.error_body().encode(), request_id, {"X-Amz-Function-Error": "Unhandled"}
                )
            else:
                self._respond(200, (result.payload or "null").encode(), request_id)

        def _error(self, status: int, error_type: str, message: str, request_id: str) -> None:
            body = json.dumps({"Type": "User", "Message": message, "message": message}).encode()
            self._respond(status, body, request_id, {"X-Amzn-ErrorType": error_type})

        def _respond(
            self, status: int, body: bytes, request_id: str, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Amzn-RequestId", request_id)
            if status in (200, 202, 204):
                self.send_header("X-Amz-Executed-Version", "$LATEST")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    return InvokeHandler


class InvokeApiServer:
    """A threaded HTTP server for the Invoke API; `url` is valid once constructed."""

    def __init__(self, backend: InvokeBackend, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = ThreadingHTTPServer((host, port), _make_handler(backend))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lambda-invoke-api", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port; safe before start() and twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
