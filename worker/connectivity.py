"""Can the instance reach the AWS services the job needs? A TCP connect to each service's endpoint.

A private subnet without a NAT gateway reaches only what its VPC endpoints serve: S3 and DynamoDB through
gateway endpoints, SSM through interface endpoints. Without a route the job's calls hang until they time
out and nothing says why; this names the service that cannot be reached and what to add. Only the route is
checked (no request is signed, so no IAM permission is needed).
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import boto3
from botocore.exceptions import BotoCoreError

SERVICES = ("s3", "dynamodb", "ssm")
NAMES = {"s3": "S3", "dynamodb": "DynamoDB", "ssm": "SSM"}
FIXES = {
    "s3": "a gateway VPC endpoint for S3 on the subnet's route table, or a NAT gateway",
    "dynamodb": "a gateway VPC endpoint for DynamoDB on the subnet's route table, or a NAT gateway",
    "ssm": "interface VPC endpoints ssm, ssmmessages and ec2messages, or a NAT gateway",
}


def endpoint_url(service: str) -> str:
    """The URL the job's client for `service` calls (AWS_ENDPOINT_URL[_<SERVICE>] locally, AWS otherwise)."""
    return boto3.client(service).meta.endpoint_url


def probe(url: str, timeout_seconds: float) -> str | None:
    """None when a TCP connection to the URL's host and port opens within the timeout, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_seconds):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def check(services: tuple[str, ...] = SERVICES, timeout_seconds: float = 5.0) -> dict[str, dict]:
    """{service: {"endpoint", "reachable", "error", "seconds"}} for each service."""
    results = {}
    for service in services:
        started = time.monotonic()
        try:
            url = endpoint_url(service)
        except BotoCoreError as exc:  # no region, say
            results[service] = {"endpoint": None, "reachable": False, "error": str(exc), "seconds": 0.0}
            continue
        error = probe(url, timeout_seconds)
        results[service] = {"endpoint": url, "reachable": error is None, "error": error,
                            "seconds": round(time.monotonic() - started, 3)}
    return results


def unreachable_message(results: dict[str, dict]) -> str | None:
    """'cannot reach DynamoDB (https://...: TimeoutError); add ...' for each unreachable service, or None."""
    problems = [
        f"cannot reach {NAMES.get(service, service)} ({result['endpoint']}: {result['error']}); add "
        f"{FIXES.get(service, 'a route to it')}"
        for service, result in results.items() if not result["reachable"]
    ]
    return "; ".join(problems) or None
