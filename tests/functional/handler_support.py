"""Helpers for calling the Lambda handlers in-process: loading, context, SQS/S3 events."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_handler(name: str):
    """Import lambdas/<name>/app.py fresh (its module scope reads settings and builds clients)."""
    module_name = f"lambda_{name}_app"
    spec = importlib.util.spec_from_file_location(module_name, REPO / "lambdas" / name / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class LambdaContext:
    function_name = "test"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"
    aws_request_id = "req-1"
    function_version = "$LATEST"

    def get_remaining_time_in_millis(self):
        return 60_000


def sqs_event(*bodies: dict) -> dict:
    """An SQS batch as the event source mapping delivers it, one record per body."""
    return {
        "Records": [
            {
                "messageId": f"m-{n}",
                "receiptHandle": f"rh-{n}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                "awsRegion": "us-east-1",
            }
            for n, body in enumerate(bodies)
        ]
    }


def s3_event(bucket: str, encoded_key: str, version_id: str | None = None, etag: str = "0123abcd", size: int = 10):
    obj = {"key": encoded_key, "size": size, "eTag": etag, "sequencer": None}
    if version_id:
        obj["versionId"] = version_id
    return {
        "Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": "2026-01-01T00:00:00.000Z", "eventName": "ObjectCreated:Put",
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "jobs",
                   "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
        }]
    }


class RecordingLambdaClient:
    def __init__(self):
        self.calls = []

    def invoke(self, **kwargs):
        self.calls.append(kwargs)
        return {"StatusCode": 202}
