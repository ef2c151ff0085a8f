"""worker.serving: a process's SIGTERM state (BatchProcess) and the run files it reads."""

from __future__ import annotations

import json
import signal

import pytest

from worker.errors import Interrupted, SpecError
from worker.serving import BatchProcess, read_run_file


@pytest.fixture
def restore_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_while_idle_only_marks_the_process(tmp_path, restore_sigterm):
    # GIVEN a process waiting for a batch (or prewarm preparing)
    process = BatchProcess(tmp_path, idle=True)
    assert not process.terminating
    # WHEN SIGTERM comes
    signal.raise_signal(signal.SIGTERM)
    # THEN nothing is raised; the process knows to stop, and a second SIGTERM is handled the same way
    assert process.terminating
    signal.raise_signal(signal.SIGTERM)
    assert process.terminating


def test_sigterm_while_a_batch_runs_interrupts_it_once(tmp_path, restore_sigterm):
    # GIVEN a process running its batch
    process = BatchProcess(tmp_path, idle=False)
    # WHEN SIGTERM comes, THEN the running job is interrupted (transient, says which signal)
    with pytest.raises(Interrupted, match=r"interrupted \(SIGTERM\)") as caught:
        signal.raise_signal(signal.SIGTERM)
    assert caught.value.transient and process.terminating
    # AND further SIGTERMs are ignored, so the failed manifest can go out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


@pytest.mark.parametrize("job_ids", [["../../etc/passwd"], ["j-0123456789abcdef/../x"], [], "j-0123456789abcdef"])
def test_a_batch_file_naming_no_valid_job_is_refused(tmp_path, job_ids):
    # GIVEN a batch file whose jobs are not job ids (hostile paths, empty, not a list)
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"jobs": job_ids}))
    # WHEN it is read, THEN it is refused before any path is built from it
    with pytest.raises(SpecError, match="a batch file must be"):
        read_run_file(batch, tmp_path)
