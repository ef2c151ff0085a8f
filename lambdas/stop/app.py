"""Lambda `stop`: a manifest.json landed (through the done queue) -> final job status -> stop the idle instance."""

from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from batchworker import aws
from batchworker.config import Settings
from batchworker.control import finish_job, stop_if_idle
from batchworker.errors import RejectedEvent
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.manifests import read_manifest

settings = Settings.from_env()
logger = Logger()
processor = BatchProcessor(event_type=EventType.SQS)
jobs = JobStore(settings.jobs_table, retention_days=settings.job_retention_days)
pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table, retention_days=settings.job_retention_days))
ledger = InstanceLedger(settings.instance_events_table)
gaps = IdleGaps(settings.instance_events_table)
s3 = aws.client("s3")


def record_handler(record: SQSRecord) -> None:
    body = record.json_body
    if body.get("Event") == "s3:TestEvent":
        logger.info("skipping s3:TestEvent")
        return
    for s3_record in S3Event(body).records:
        bucket = s3_record.s3.bucket.name
        key = unquote_plus(s3_record.s3.get_object.key)
        if bucket != settings.output_bucket:
            logger.warning("event from an unexpected bucket ignored", extra={"bucket": bucket})
            continue
        try:
            manifest = read_manifest(s3, bucket, key)
        except RejectedEvent as exc:
            logger.warning("not a job manifest; ignored", extra={"reason": str(exc)})
            continue
        instance_id = finish_job(manifest, key, jobs, ledger)
        logger.info("job finished", extra={"job_id": manifest["job_id"], "status": manifest["status"]})
        if instance_id:
            finished_on.add(instance_id)


finished_on: set[str] = set()


@logger.inject_lambda_context
def handler(event, context):
    finished_on.clear()
    result = process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
    # One stop decision per instance per batch, after every job of the batch is recorded. Should this
    # fail, the records are already acknowledged: the reaper stops the idle instance on its next pass.
    for instance_id in sorted(finished_on):
        decision = stop_if_idle(instance_id, "jobs finished", settings, jobs, pool, ledger, gaps=gaps)
        logger.info("stop decision", extra={"instance_id": instance_id, "stop": decision.stop, "reason": decision.reason})
    return result
