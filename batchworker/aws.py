"""AWS clients of the control plane: botocore's "standard" retries ride out throttling and server errors.

Standard mode retries throttling (RequestLimitExceeded, Throttling, ThrottlingException,
ProvisionedThroughputExceededException, ...) and transient errors with exponential backoff and full jitter.
Loops that wait on AWS also back off on their own when throttling outlasts those retries (`is_throttling`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from batchworker.errors import RetryableError

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


def is_condition_failure(exc: ClientError) -> bool:
    """A conditional write whose condition did not hold."""
    return error_code(exc) == "ConditionalCheckFailedException"


BATCH_GET_KEYS = 100  # BatchGetItem's limit
UNPROCESSED_RETRIES = 8


def batch_get(dynamodb, table_name: str, keys: list[dict], sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """The items with these keys that exist, strongly consistent, in as few BatchGetItem calls as fit (100 keys
    each); keys DynamoDB leaves unprocessed (throttled) are asked again with jittered backoff."""
    unique = list({json.dumps(key, sort_keys=True): key for key in keys}.values())
    items: list[dict] = []
    for start in range(0, len(unique), BATCH_GET_KEYS):
        request = {table_name: {"Keys": unique[start : start + BATCH_GET_KEYS], "ConsistentRead": True}}
        for attempt in range(UNPROCESSED_RETRIES + 1):
            response = dynamodb.batch_get_item(RequestItems=request)
            items.extend(response.get("Responses", {}).get(table_name, []))
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
            if attempt == UNPROCESSED_RETRIES:
                raise RetryableError(f"DynamoDB left {len(request[table_name]['Keys'])} reads of {table_name} unprocessed")
            sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))  # throttled: back off, with jitter
    return items
