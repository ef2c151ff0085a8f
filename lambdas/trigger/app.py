"""Lambda `trigger`: S3 upload events (through the jobs queue) -> job QUEUED -> instance starting -> worker invoked."""

import json
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from batchworker import aws
from batchworker.config import Settings
from batchworker.control import Upload, accept_upload
from batchworker.errors import RejectedEvent
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobpkg.registry import PackageRegistry
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.placement import Placer
from batchworker.routing import PackageLookup

settings = Settings.from_env()
logger = Logger()
processor = BatchProcessor(event_type=EventType.SQS)
jobs = JobStore(settings.jobs_table, retention_days=settings.job_retention_days)
pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table, retention_days=settings.job_retention_days))
ledger = InstanceLedger(settings.instance_events_table)
gaps = IdleGaps(settings.instance_events_table)
lambda_client = aws.client("lambda")
s3 = aws.client("s3")
registry = PackageRegistry(settings.artifacts_bucket, s3)


class Dispatches:
    """Jobs accepted in this invocation, per instance: one worker invocation per instance, not per upload.

    Also holds the batch's Placer and package lookup, so the pool, its ledger items and each package pointer
    are read once per batch, not once per upload.
    """

    def __init__(self):
        self.by_instance: dict[str, list[str]] = {}
        self._placer: Placer | None = None
        self._packages: PackageLookup | None = None

    def placer(self) -> Placer:
        if self._placer is None:
            gaps.note_arrival()  # closes the pool's idle gap, if one is open
            # The pool once, and its ledger items in one BatchGetItem: never the jobs table's status index.
            self._placer = Placer(pool.list(), ledger, settings.max_jobs_per_instance)
        return self._placer

    def packages(self) -> PackageLookup:
        if self._packages is None:
            self._packages = PackageLookup(registry)
        return self._packages

    def add(self, job_id: str, instance_id: str) -> None:
        self.by_instance.setdefault(instance_id, []).append(job_id)

    def flush(self) -> None:
        # If this fails after the records were acknowledged, the reaper re-dispatches the QUEUED jobs.
        for job_ids in self.by_instance.values():
            lambda_client.invoke(
                FunctionName=settings.worker_function,
                InvocationType="Event",
                Payload=json.dumps({"job_ids": job_ids}).encode(),
            )
        self.by_instance.clear()
        self._placer = None
        self._packages = None


dispatches = Dispatches()


def object_facts(bucket: str, key: str, version_id: str | None) -> tuple[str | None, dict[str, str]]:
    """The object's version (moto's events never carry versionId; S3's do) and its user metadata.

    The metadata holds `param-<name>` job parameters.
    """
    if bucket != settings.input_bucket:
        return version_id, {}
    extra = {"VersionId": version_id} if version_id else {}
    try:
        head = s3.head_object(Bucket=bucket, Key=key, **extra)
    except s3.exceptions.ClientError:
        return version_id, {}
    return version_id or head.get("VersionId"), head.get("Metadata", {})


def record_handler(record: SQSRecord) -> None:
    body = record.json_body
    if body.get("Event") == "s3:TestEvent":
        logger.info("skipping s3:TestEvent")
        return
    for s3_record in S3Event(body).records:
        obj = s3_record.s3.get_object
        bucket, key = s3_record.s3.bucket.name, unquote_plus(obj.key)  # S3 (and moto) URL-encode keys in events
        version_id, metadata = object_facts(bucket, key, obj.version_id or None)
        upload = Upload(
            bucket=bucket, key=key, size_bytes=obj.size, etag=obj.etag or None, version_id=version_id,
            metadata=metadata,
        )
        try:
            job_id = accept_upload(
                upload, settings, jobs, pool, ledger, dispatches.add, s3, dispatches.placer(), dispatches.packages()
            )
        except RejectedEvent as exc:
            # Retrying cannot make this event valid; log it and let the rest of the batch go on.
            logger.warning("rejected event", extra={"reason": str(exc), "bucket": upload.bucket})
            continue
        logger.info("upload accepted", extra={"job_id": job_id, "key": upload.key})


@logger.inject_lambda_context
def handler(event, context):
    try:
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
    finally:
        dispatches.flush()
