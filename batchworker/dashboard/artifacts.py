"""What a job left in S3, read for the job page: manifest, log tail, results head and chart, image previews.

Every read is bounded (ranged GETs, size caps): a job's outputs can be large and their content is hostile.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from batchworker import aws
from batchworker.models import manifest_key, output_prefix

MANIFEST_MAX_BYTES = 1024 * 1024
LOG_TAIL_BYTES = 64 * 1024
LOG_TAIL_LINES = 200
RESULTS_READ_BYTES = 4 * 1024 * 1024
RESULTS_HEAD_ROWS = 20
PREVIEW_MAX_BYTES = 8 * 1024 * 1024
PREVIEW_MAX_COUNT = 12
# Raster images only: an SVG is a document that can run script.
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp"}
RESULTS_NAMES = ("results.csv", "predictions.csv")  # predictions.csv: jobs of the removed built-in model job
CONFIDENCE_BINS = 10
ERRORS_NAME = "errors.jsonl"
ERRORS_READ_BYTES = 256 * 1024
ERRORS_HEAD_LINES = 20


def image_type(key: str) -> str | None:
    dot = key.rfind(".")
    return IMAGE_TYPES.get(key[dot:].lower()) if dot >= 0 else None


@dataclass
class ResultsSummary:
    name: str
    columns: list[str]
    head: list[list[str]]
    rows_read: int
    truncated: bool
    label_counts: list[tuple[str, int]] = field(default_factory=list)
    confidence_bins: list[int] = field(default_factory=list)

    @property
    def chart(self) -> dict | None:
        """Data for the job page's charts (classifiers: a `label` column, maybe `confidence`)."""
        if not self.label_counts:
            return None
        return {
            "labels": [label for label, _ in self.label_counts],
            "counts": [count for _, count in self.label_counts],
            "confidence_bins": self.confidence_bins,
            "bin_edges": [round(i / CONFIDENCE_BINS, 2) for i in range(CONFIDENCE_BINS + 1)],
        }


class JobArtifacts:
    """Reads one deployment's output bucket (and input objects, for previews)."""

    def __init__(self, output_bucket: str, client):
        self.output_bucket = output_bucket
        self.client = client

    def manifest(self, job_id: str) -> dict | None:
        """The job's manifest; None before the job ends."""
        try:
            response = self.client.get_object(Bucket=self.output_bucket, Key=manifest_key(job_id))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        try:
            document = json.loads(response["Body"].read(MANIFEST_MAX_BYTES))
        except ValueError:
            return {"unreadable": "manifest.json is not JSON (or larger than 1 MiB)"}
        return document if isinstance(document, dict) else {"unreadable": "manifest.json is not an object"}

    def output_keys(self, job_id: str, limit: int = 1000) -> list[str]:
        response = self.client.list_objects_v2(Bucket=self.output_bucket, Prefix=output_prefix(job_id), MaxKeys=limit)
        return [obj["Key"] for obj in response.get("Contents", [])]

    def log_tail(self, job_id: str) -> tuple[list[str], bool] | None:
        """The last lines of the job's log, and whether earlier ones were left out; None without a log."""
        try:
            response = self.client.get_object(
                Bucket=self.output_bucket, Key=output_prefix(job_id) + "job.log", Range=f"bytes=-{LOG_TAIL_BYTES}"
            )
        except ClientError as exc:
            if _is_missing(exc) or aws.error_code(exc) == "InvalidRange":  # InvalidRange: an empty log
                return None if _is_missing(exc) else ([], False)
            raise
        raw = response["Body"].read()
        text = raw.decode(errors="replace")
        cut = _object_size(response, len(raw)) > len(raw)
        lines = text.splitlines()
        if cut and lines:
            lines = lines[1:]  # the first line is likely partial
        return lines[-LOG_TAIL_LINES:], cut or len(lines) > LOG_TAIL_LINES

    def results(self, job_id: str, keys: list[str]) -> ResultsSummary | None:
        prefix = output_prefix(job_id)
        name = next((n for n in RESULTS_NAMES if prefix + n in keys), None)
        if name is None:
            return None
        response, raw = self._head_bytes(prefix + name, RESULTS_READ_BYTES)
        truncated = _object_size(response, len(raw)) > len(raw)
        text = raw.decode(errors="replace")
        if truncated:
            text = text[: text.rfind("\n") + 1]  # drop the partial last row
        return summarize_results(name, text, truncated)

    def item_errors(self, job_id: str, keys: list[str]) -> tuple[list[dict], bool] | None:
        """The first failed items of a package job (errors.jsonl: item, type, message), and whether there are more."""
        key = output_prefix(job_id) + ERRORS_NAME
        if key not in keys:
            return None
        response, raw = self._head_bytes(key, ERRORS_READ_BYTES)
        lines = raw.decode(errors="replace").splitlines()
        errors = []
        for line in lines[:ERRORS_HEAD_LINES]:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by the range
            if isinstance(record, dict):
                errors.append({name: str(record.get(name, "")) for name in ("item", "type", "message")})
        return errors, len(lines) > ERRORS_HEAD_LINES or _object_size(response, len(raw)) > len(raw)

    def _head_bytes(self, key: str, limit: int) -> tuple[dict, bytes]:
        """The first `limit` bytes of an output object (a ranged GET), and the response; an empty object (a
        package job with no failed item uploads an empty errors.jsonl) answers a range with InvalidRange."""
        try:
            response = self.client.get_object(Bucket=self.output_bucket, Key=key, Range=f"bytes=0-{limit - 1}")
        except ClientError as exc:
            if aws.error_code(exc) == "InvalidRange":
                return {}, b""
            raise
        return response, response["Body"].read()

    def object_bytes(self, bucket: str, key: str) -> bytes | None:
        """A whole object up to PREVIEW_MAX_BYTES; None when it is missing or larger."""
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc) or aws.error_code(exc) in ("404", "403"):
                return None
            raise
        if head["ContentLength"] > PREVIEW_MAX_BYTES:
            return None
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read(PREVIEW_MAX_BYTES + 1)

    def uploaded_at(self, bucket: str, key: str) -> str | None:
        try:
            return self.client.head_object(Bucket=bucket, Key=key)["LastModified"].isoformat()
        except ClientError:
            return None


def summarize_results(name: str, text: str, truncated: bool) -> ResultsSummary:
    reader = csv.reader(io.StringIO(text))
    columns = next(reader, [])
    head: list[list[str]] = []
    labels: Counter[str] = Counter()
    bins = [0] * CONFIDENCE_BINS
    label_at = columns.index("label") if "label" in columns else None
    confidence_at = columns.index("confidence") if "confidence" in columns else None
    rows = 0
    for row in reader:
        rows += 1
        if len(head) < RESULTS_HEAD_ROWS:
            head.append(row)
        if label_at is not None and label_at < len(row) and row[label_at] != "":
            labels[row[label_at]] += 1
        if confidence_at is not None and confidence_at < len(row):
            try:
                value = float(row[confidence_at])
            except ValueError:
                continue
            if math.isfinite(value) and 0.0 <= value <= 1.0:
                bins[min(int(value * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] += 1
    if all(label.lstrip("-").isdigit() for label in labels):  # class numbers: in their own order
        ordered = sorted(labels.items(), key=lambda item: int(item[0]))[:50]
    else:
        ordered = sorted(labels.items(), key=lambda item: (-item[1], item[0]))[:50]
    return ResultsSummary(name, columns, head, rows, truncated, ordered, bins if confidence_at is not None else [])


def _object_size(response: dict, read: int) -> int:
    """The whole object's size from a ranged GET's Content-Range (`bytes 0-99/1234`); `read` without one."""
    total = response.get("ContentRange", "").rsplit("/", 1)[-1]
    return int(total) if total.isdigit() else read


def _is_missing(exc: ClientError) -> bool:
    return aws.error_code(exc) in ("NoSuchKey", "404", "NotFound")
