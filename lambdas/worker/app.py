"""Lambda `worker` (the dispatcher, not the GPU instance): wait for the instance, start the job, return.

The job starts through SSM Run Command or SSH (`BATCHWORKER_TRANSPORT`); see batchworker.transports.
"""

import re

import boto3
from aws_lambda_powertools import Logger

from batchworker.config import Settings
from batchworker.control import dispatch_job
from batchworker.errors import PermanentError
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.transports import make_launcher

JOB_ID = re.compile(r"^j-[0-9a-f]{16}$")

settings = Settings.from_env()
logger = Logger()
jobs = JobStore(settings.jobs_table)
pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table))
launcher = make_launcher(settings, boto3.client("ssm"))
s3 = boto3.client("s3")


@logger.inject_lambda_context
def handler(event, context):
    job_id = event.get("job_id") if isinstance(event, dict) else None
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise PermanentError(f"event has no valid job_id: {event!r:.200}")
    logger.append_keys(job_id=job_id)
    status = dispatch_job(job_id, settings, jobs, pool, launcher, s3)
    logger.info("dispatch finished", extra={"status": status.value})
    return {"job_id": job_id, "status": status.value}
