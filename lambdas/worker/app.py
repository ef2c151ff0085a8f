"""Lambda `worker` (the dispatcher, not the GPU instance): wait for the instance, start the jobs, return.

Event: {"job_ids": [...]} (a burst placed on one instance). The jobs start through SSM Run Command or
SSH (`BATCHWORKER_TRANSPORT`); see batchworker.transports.
"""

import re

from aws_lambda_powertools import Logger

from batchworker import aws
from batchworker.config import Settings
from batchworker.control import dispatch_jobs
from batchworker.errors import PermanentError
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.transports import make_launcher

JOB_ID = re.compile(r"^j-[0-9a-f]{16}$")
MAX_JOBS_PER_EVENT = 1000

settings = Settings.from_env()
logger = Logger()
jobs = JobStore(settings.jobs_table, retention_days=settings.job_retention_days)
pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table, retention_days=settings.job_retention_days))
launcher = make_launcher(settings, aws.client("ssm"))
ledger = InstanceLedger(settings.instance_events_table)  # jobs moved to another AZ for capacity
s3 = aws.client("s3")


def job_ids_of(event) -> list[str]:
    job_ids = event.get("job_ids") if isinstance(event, dict) else None
    if (
        not isinstance(job_ids, list)
        or not 0 < len(job_ids) <= MAX_JOBS_PER_EVENT
        or not all(isinstance(j, str) and JOB_ID.match(j) for j in job_ids)
    ):
        raise PermanentError(f"event must be {{'job_ids': [<1..{MAX_JOBS_PER_EVENT} job ids>]}}, got {event!r:.200}")
    return job_ids


@logger.inject_lambda_context
def handler(event, context):
    job_ids = job_ids_of(event)
    logger.append_keys(job_ids=job_ids[:20])
    outcome = dispatch_jobs(job_ids, settings, jobs, pool, launcher, s3, ledger=ledger)
    result = {job_id: status.value for job_id, status in outcome.items()}
    logger.info("dispatch finished", extra={"statuses": result})
    return {"statuses": result}
