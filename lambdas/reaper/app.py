"""Lambda `reaper` (EventBridge schedule): whatever else breaks, no GPU keeps running with nothing to do."""

import json

from aws_lambda_powertools import Logger

from batchworker import aws
from batchworker.config import Settings
from batchworker.idle_gaps import IdleGaps
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.reaper import reap

settings = Settings.from_env()
logger = Logger()
jobs = JobStore(settings.jobs_table, retention_days=settings.job_retention_days)
pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table, retention_days=settings.job_retention_days))
ledger = InstanceLedger(settings.instance_events_table)
gaps = IdleGaps(settings.instance_events_table)
lambda_client = aws.client("lambda")
s3 = aws.client("s3")


def invoke_worker(payload: dict) -> None:
    lambda_client.invoke(
        FunctionName=settings.worker_function, InvocationType="Event", Payload=json.dumps(payload).encode()
    )


@logger.inject_lambda_context
def handler(event, context):
    report = reap(settings, jobs, pool, ledger, s3, invoke_worker, gaps=gaps)
    result = {"failed": report.failed, "redispatched": report.redispatched, "stopped": report.stopped,
              "finished": report.finished, "nudged": report.nudged}
    logger.info("reaper pass", extra=result)
    return result
