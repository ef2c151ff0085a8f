"""A small soak inside `make test`: 100 uploads, 10% of events twice, bad inputs, faults; nothing lost."""

import pytest

from batchworker.local.soak import Soak, is_lost_job_error

pytestmark = pytest.mark.integration


def test_small_soak_loses_nothing_and_runs_nothing_twice(local_cloud):
    report = Soak(local_cloud.local_dir, seed=1).run(uploads=100, timeout_seconds=600)
    print("\n".join(f"{name}: {value}" for name, value in report.rows()))
    assert report.lost == []
    assert report.duplicate_runs == 0
    assert report.duplicate_deliveries > 0
    assert report.bad_inputs_failed_clearly == report.bad_inputs_tried
    # With one attempt per job in this cloud, jobs on the instance stopped mid-burst (or in the job process
    # killed) end failed, with a manifest saying why; every other good input succeeds. Waiting is never a
    # failure: a job no fault hit is never taken for lost, however long it waited for its package's process.
    assert all(is_lost_job_error(f) for f in report.unexpected_failures), report.unexpected_failures
    assert report.lost_without_fault == [], report.lost_without_fault
    assert set(report.instance_states) == {"stopped"}
