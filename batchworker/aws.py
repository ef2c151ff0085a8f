"""AWS clients of the control plane: botocore's "standard" retries ride out throttling and server errors.

Standard mode retries throttling (RequestLimitExceeded, Throttling, ThrottlingException,
ProvisionedThroughputExceededException, ...) and transient errors with exponential backoff and full jitter.
Loops that wait on AWS also back off on their own when throttling outlasts those retries (`is_throttling`).
"""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

RETRY_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8})

THROTTLING_CODES = frozenset({
    "RequestLimitExceeded",  # EC2
    "Throttling",
    "ThrottlingException",
    "ProvisionedThroughputExceededException",  # DynamoDB
    "RequestThrottledException",
    "TooManyRequestsException",  # Lambda
    "SlowDown",  # S3
})


def client(service: str, **kwargs):
    """A boto3 client with the control plane's retry configuration."""
    return boto3.client(service, config=RETRY_CONFIG, **kwargs)


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def is_throttling(exc: ClientError) -> bool:
    return error_code(exc) in THROTTLING_CODES
