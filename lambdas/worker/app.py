"""Lambda `worker` (the dispatcher, not the GPU instance): wait for the instance, start the jobs, return.

Events:
- {"job_ids": [...]} (a burst placed on one instance, from the trigger or the reaper);
- an EC2 "Instance State-change Notification" (EventBridge, terraform/events.tf): `running` launches the jobs
  waiting on the instance; `stopped` starts it again if jobs were placed on it while it was stopping.
One invocation at a time dispatches an instance (its ledger claim); the others hand their jobs over and
return. The jobs start through SSM Run Command or SSH (`BATCHWORKER_TRANSPORT`); see batchworker.transports.
"""

import re

from aws_lambda_powertools import Logger

from batchworker import aws
from batchworker.config import Settings
from batchworker.control import dispatch_instance, dispatch_jobs
from batchworker.errors import PermanentError
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.jobs import JobStore
from batchworker.ledger import InstanceLedger
from batchworker.transports import make_launcher

JOB_ID = re.compile(r"^j-[0-9a-f]{16}$")
INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
STATE_CHANGE = "EC2 Instance State-change Notification"
MAX_JOBS_PER_EVENT = 1000

settings = Settings.from_env()
logger = Logger()
jobs = JobStore(settings.jobs_table, retention_days=settings.job_retention_days)
pool = InstancePool(settings.pool_tag, InstanceHistory(settings.instance_events_table, retention_days=settings.job_retention_days))
launcher = make_launcher(settings, aws.client("ssm"))
ledger = InstanceLedger(settings.instance_events_table)  # the dispatch claim; jobs moved to another AZ
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


def state_change_of(event) -> tuple[str, str] | None:
    """(instance id, state) of an EC2 state-change event; None for any other event."""
    if not isinstance(event, dict) or event.get("detail-type") != STATE_CHANGE or event.get("source") != "aws.ec2":
        return None
    detail = event.get("detail") or {}
    instance_id, state = detail.get("instance-id"), detail.get("state")
    if not isinstance(instance_id, str) or not INSTANCE_ID.match(instance_id) or not isinstance(state, str):
        raise PermanentError(f"state-change event without a valid instance-id and state: {detail!r:.200}")
    return instance_id, state


@logger.inject_lambda_context(clear_state=True)  # keys appended for one event never leak into the next
def handler(event, context):
    owner = context.aws_request_id
    # The claim lapses when this invocation can no longer be running (its timeout); it lets go 30 s before.
    claim_seconds = context.get_remaining_time_in_millis() / 1000
    if (change := state_change_of(event)) is not None:
        instance_id, state = change
        logger.append_keys(instance_id=instance_id, state=state)
        if not ledger.read(instance_id).placed_job_ids:
            logger.info("no job placed on the instance; nothing to do")  # or not an instance of this pool
            return {"statuses": {}}
        outcome = dispatch_instance(instance_id, settings, jobs, pool, launcher, s3, ledger,
                                    owner=owner, claim_seconds=claim_seconds)
    else:
        job_ids = job_ids_of(event)
        logger.append_keys(job_ids=job_ids[:20])
        outcome = dispatch_jobs(job_ids, settings, jobs, pool, launcher, s3, ledger=ledger, owner=owner,
                                claim_seconds=claim_seconds)
    result = {job_id: status.value for job_id, status in outcome.items()}
    logger.info("dispatch finished", extra={"statuses": result})
    return {"statuses": result}
