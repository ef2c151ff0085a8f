"""SQS event source mappings for the local Lambda runtime: poll, invoke, delete what succeeded."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchworker.local.lambda_pool import InvocationResult, PoolClosed

logger = logging.getLogger(__name__)

MAX_RECEIVE_BATCH = 10  # SQS ReceiveMessage limit
WAIT_TIME_SECONDS = 1  # moto honours long polling and returns as soon as a message arrives


@dataclass(frozen=True)
class SqsMapping:
    """One SQS event source mapping as moto stores it (we poll it whatever its State)."""

    uuid: str
    queue_arn: str
    function_name: str
    batch_size: int
    batching_window_seconds: float
    report_batch_item_failures: bool

    @classmethod
    def from_api(cls, mapping: dict[str, Any]) -> SqsMapping:
        return cls(
            uuid=mapping["UUID"],
            queue_arn=mapping["EventSourceArn"],
            function_name=mapping["FunctionArn"].split(":")[6],
            batch_size=int(mapping.get("BatchSize") or 10),
            batching_window_seconds=float(mapping.get("MaximumBatchingWindowInSeconds") or 0),
            report_batch_item_failures="ReportBatchItemFailures"
            in (mapping.get("FunctionResponseTypes") or []),
        )


def _lambda_message_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """SQS API message attributes -> the camelCase shape Lambda puts in SQS events."""
    converted = {}
    for name, value in attributes.items():
        binary = value.get("BinaryValue")
        converted[name] = {
            "stringValue": value.get("StringValue"),
            "binaryValue": base64.b64encode(binary).decode() if binary is not None else None,
            "stringListValues": value.get("StringListValues", []),
            "binaryListValues": [base64.b64encode(b).decode() for b in value.get("BinaryListValues", [])],
            "dataType": value["DataType"],
        }
    return {k: {f: v for f, v in attrs.items() if v is not None} for k, attrs in converted.items()}


def build_sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda hands to a function for a batch of received SQS messages."""
    region = queue_arn.split(":")[3]
    records = []
    for message in messages:
        record = {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": _lambda_message_attributes(message.get("MessageAttributes", {})),
            "md5OfBody": message["MD5OfBody"],
            "eventSource": "aws:sqs",
            "eventSourceARN": queue_arn,
            "awsRegion": region,
        }
        if "MD5OfMessageAttributes" in message:
            record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
        records.append(record)
    return {"Records": records}


def select_deletions(
    messages: list[dict[str, Any]], result: InvocationResult, report_batch_item_failures: bool
) -> list[dict[str, Any]]:
    """The messages to delete after an invocation, by Lambda's rules for SQS batches.

    A function error deletes nothing. Without ReportBatchItemFailures a success deletes all. With it, a
    missing, null or empty `batchItemFailures` deletes all; listed message ids stay; a malformed response
    or an unknown, empty or null itemIdentifier fails the whole batch (deletes nothing).
    """
    if result.is_error:
        return []
    if not report_batch_item_failures:
        return list(messages)
    try:
        response = result.result()
    except ValueError:
        return []
    if response is None:
        return list(messages)
    if not isinstance(response, dict):
        return []
    failures = response.get("batchItemFailures")
    if not failures:
        return list(messages)
    if not isinstance(failures, list):
        return []
    ids = {message["MessageId"] for message in messages}
    failed = set()
    for failure in failures:
        item = failure.get("itemIdentifier") if isinstance(failure, dict) else None
        if not item or item not in ids:
            return []
        failed.add(item)
    return [message for message in messages if message["MessageId"] not in failed]


class SqsPoller(threading.Thread):
    """Polls one mapped queue until `stop` is set and feeds batches to its function."""

    def __init__(
        self,
        mapping: SqsMapping,
        sqs: Any,
        invoke: Callable[[str], InvocationResult],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"sqs-poller-{mapping.function_name}", daemon=True)
        self.mapping = mapping
        self._sqs = sqs
        self._invoke = invoke
        self._stopping = stop
        account, name = mapping.queue_arn.split(":")[4:6]
        self._queue_url = sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                messages = self._receive_batch()
                if messages:
                    self._process(messages)
            except PoolClosed:
                return
            except Exception:  # a poller survives moto hiccups, as Lambda's pollers do
                if self._stopping.is_set():
                    return
                logger.exception(
                    "polling %s for %s failed; retrying", self._queue_url, self.mapping.function_name
                )
                self._stopping.wait(1.0)

    def _receive(self, max_messages: int, wait_seconds: int) -> list[dict[str, Any]]:
        response = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait_seconds,
            AttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return response.get("Messages", [])

    def _receive_batch(self) -> list[dict[str, Any]]:
        """Up to BatchSize messages, gathering for up to MaximumBatchingWindowInSeconds once one arrived."""
        batch_size = self.mapping.batch_size
        messages = self._receive(min(batch_size, MAX_RECEIVE_BATCH), WAIT_TIME_SECONDS)
        if not messages or self.mapping.batching_window_seconds <= 0:
            return messages
        window_ends = time.monotonic() + self.mapping.batching_window_seconds
        while len(messages) < batch_size and not self._stopping.is_set():
            remaining = window_ends - time.monotonic()
            if remaining <= 0:
                break
            wait = min(WAIT_TIME_SECONDS, max(0, int(remaining)))
            messages += self._receive(min(batch_size - len(messages), MAX_RECEIVE_BATCH), wait)
            if wait == 0:
                self._stopping.wait(min(remaining, 0.2))
        return messages

    def _process(self, messages: list[dict[str, Any]]) -> None:
        event = build_sqs_event(messages, self.mapping.queue_arn)
        result = self._invoke(json.dumps(event))
        to_delete = select_deletions(messages, result, self.mapping.report_batch_item_failures)
        logger.debug(
            "%s: %d received, %d to delete%s",
            self.mapping.function_name,
            len(messages),
            len(to_delete),
            f" ({result.error_type})" if result.is_error else "",
        )
        for start in range(0, len(to_delete), MAX_RECEIVE_BATCH):
            chunk = to_delete[start : start + MAX_RECEIVE_BATCH]
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)]
            response = self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
            for failure in response.get("Failed", []):
                logger.warning("could not delete a message from %s: %s", self._queue_url, failure)
