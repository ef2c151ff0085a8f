"""The queues page: depth of the jobs and done queues and their dead-letter queues, and the DLQ messages.

Dead-letter messages are peeked, not consumed: received with a visibility timeout of 0, so they stay
visible to everyone else and are never deleted (each peek does count as a receive in
ApproximateReceiveCount; a dead-letter queue has no redrive of its own, so nothing moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from batchworker.models import isoformat

# Queue name suffixes (terraform/sqs.tf: "<name_prefix>-<suffix>"; the pool tag is the name prefix).
QUEUES = (("jobs", "uploads waiting for the trigger"), ("jobs-dlq", "uploads the trigger gave up on"),
          ("done", "manifests waiting for the stop function"), ("done-dlq", "manifests the stop function gave up on"),
          ("worker-dlq", "failed asynchronous invocations of the worker function"))
PEEK_RECEIVES = 3
BODY_PREVIEW_CHARS = 4000


@dataclass
class QueueView:
    name: str
    purpose: str
    url: str | None
    visible: int | None = None
    in_flight: int | None = None
    delayed: int | None = None
    error: str | None = None
    messages: list[dict] = field(default_factory=list)

    @property
    def is_dead_letter(self) -> bool:
        return self.name.endswith("-dlq")


class Queues:
    def __init__(self, name_prefix: str, client):
        self.name_prefix = name_prefix
        self.client = client
        self._urls: dict[str, str] = {}

    def views(self) -> list[QueueView]:
        views = []
        for suffix, purpose in QUEUES:
            name = f"{self.name_prefix}-{suffix}"
            view = QueueView(name, purpose, None)
            try:
                view.url = self._url(name)
                attributes = self.client.get_queue_attributes(
                    QueueUrl=view.url,
                    AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                    "ApproximateNumberOfMessagesDelayed"],
                )["Attributes"]
                view.visible = int(attributes.get("ApproximateNumberOfMessages", 0))
                view.in_flight = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
                view.delayed = int(attributes.get("ApproximateNumberOfMessagesDelayed", 0))
                if view.is_dead_letter and view.visible:
                    view.messages = self.peek(view.url)
            except ClientError as exc:
                view.error = exc.response.get("Error", {}).get("Message") or str(exc)
            views.append(view)
        return views

    def peek(self, url: str) -> list[dict]:
        """Up to 30 messages of a dead-letter queue, left where they are."""
        seen: dict[str, dict] = {}
        for _ in range(PEEK_RECEIVES):
            response = self.client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0,
                AttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )
            for message in response.get("Messages", []):
                body = message.get("Body", "")
                seen.setdefault(message["MessageId"], {
                    "id": message["MessageId"],
                    "sent_at": _sent_at(message.get("Attributes", {}).get("SentTimestamp")),
                    "receives": message.get("Attributes", {}).get("ApproximateReceiveCount"),
                    "body": body[:BODY_PREVIEW_CHARS],
                    "cut": len(body) > BODY_PREVIEW_CHARS,
                })
        return sorted(seen.values(), key=lambda m: m["sent_at"] or "")

    def _url(self, name: str) -> str:
        if name not in self._urls:
            self._urls[name] = self.client.get_queue_url(QueueName=name)["QueueUrl"]
        return self._urls[name]


def _sent_at(milliseconds: str | None) -> str | None:
    try:
        return isoformat(datetime.fromtimestamp(int(milliseconds) / 1000, tz=timezone.utc))
    except (TypeError, ValueError):
        return None
