"""Compute-only workloads of a chosen duration, for load, pool and cost tests.

The input is a .json file holding exactly {"workload": W, "seconds": S} with 0 < S <= 3600, W one of:
- "compute": forward passes on random data for S seconds (keeps the device, or the CPU, busy);
- "hold": one forward pass, then the job keeps its slot for S seconds without using the host CPU, as a
  job waiting on its GPU does. Instances of the local cloud share this machine's cores, so only "hold"
  measures how throughput grows with the pool rather than how many cores the machine has.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from worker.errors import InputError
from worker.model import LoadedModel, predict

MAX_COMPUTE_SECONDS = 3600
MAX_WORKLOAD_BYTES = 4096
BATCH_ITEMS = 64  # forward passes between two looks at the clock
COMPUTE_ITEM = "compute"  # the `item` of the single predictions.csv row
WORKLOADS = ("compute", "hold")
FORMAT_HINT = (
    f'a .json input must be a compute workload, exactly {{"workload": "compute" or "hold", "seconds": S}} '
    f"with 0 < S <= {MAX_COMPUTE_SECONDS}"
)


def parse_workload(path: Path, name: str) -> tuple[str, float]:
    """The workload's kind and seconds; InputError saying what a workload file looks like for anything else."""
    with path.open("rb") as fh:
        data = fh.read(MAX_WORKLOAD_BYTES + 1)
    if len(data) > MAX_WORKLOAD_BYTES:
        raise InputError(f"{name} is larger than {MAX_WORKLOAD_BYTES} bytes; {FORMAT_HINT}")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{name} is not valid JSON ({exc}); {FORMAT_HINT}") from exc
    seconds = raw.get("seconds") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or set(raw) != {"workload", "seconds"}
        or raw["workload"] not in WORKLOADS
        or not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_COMPUTE_SECONDS
    ):
        raise InputError(f"{name} is not a compute workload; {FORMAT_HINT}")
    return raw["workload"], float(seconds)


def run_workload(model: LoadedModel, kind: str, seconds: float, seed: int = 0) -> tuple[int, np.ndarray]:
    """Run the workload for `seconds`; the items passed forward and the last batch's probabilities."""
    rng = np.random.default_rng(seed)
    pixels = rng.random((BATCH_ITEMS, *model.model_input.shape), dtype=np.float32)
    deadline = time.monotonic() + seconds
    items = 0
    while True:
        probs = predict(model, pixels, batch_size=BATCH_ITEMS)
        items += len(pixels)
        if kind == "hold":
            time.sleep(max(0.0, deadline - time.monotonic()))
        if time.monotonic() >= deadline:
            return items, probs
