"""Placing a batch's jobs on the pool: each slot claimed with a conditional write on the instance's ledger item.

Trigger batches run at the same time, each planning from its own reading of the pool. A batch reads the pool
and every instance's ledger item once (`InstanceLedger.read_many`, one BatchGetItem per 100 instances: never the
jobs table's status index), ranks the instances with the pure `place_job`, and claims the chosen slot with
`InstanceLedger.place`, which refuses when the instance already holds `max_jobs_per_instance` placed jobs. A
refusal means another batch filled it since the reading: the batch counts it as full and takes the next
instance. Only when every instance is full does a job go past the limit (it waits for a slot there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from batchworker.decisions import Placement, place_job
from batchworker.ledger import InstanceLedger
from batchworker.models import Instance, InstanceState

logger = logging.getLogger(__name__)


class Placer:
    """Places the jobs of one batch: reads the pool's ledger items once, then claims one slot per job."""

    def __init__(self, instances: Iterable[Instance], ledger: InstanceLedger, max_jobs_per_instance: int):
        self.instances = list(instances)
        self.ledger = ledger
        self.max_jobs_per_instance = max_jobs_per_instance
        entries = ledger.read_many(i.instance_id for i in self.instances)
        self.load = {i.instance_id: len(entries[i.instance_id].placed_job_ids) for i in self.instances}

    def place(self, job_id: str) -> Placement | None:
        """Place the job and record it in the instance's ledger item (which voids any stop claimed before)."""
        while True:  # each refusal marks one instance full, so this ends within len(instances) + 1 rounds
            placement = place_job(self.instances, self.load, self.max_jobs_per_instance)
            if placement is None:
                return None
            if placement.over_limit:
                self.ledger.note_assignment(placement.instance_id, job_ids=[job_id])
            elif self.ledger.place(placement.instance_id, job_id, self.max_jobs_per_instance) is None:
                logger.info("instance %s filled up meanwhile (another batch); placing job %s elsewhere",
                            placement.instance_id, job_id)
                self.load[placement.instance_id] = self.max_jobs_per_instance
                continue
            self.load[placement.instance_id] += 1
            if placement.start:  # started: it counts as up for the rest of the batch
                self.instances = [
                    Instance(i.instance_id, InstanceState.PENDING, i.instance_type, i.launch_time, i.availability_zone)
                    if i.instance_id == placement.instance_id else i
                    for i in self.instances
                ]
            return placement
