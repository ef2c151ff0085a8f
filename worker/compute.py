"""The compute-only workload for load and cost tests: forward passes on random data for a chosen time.

The input is a .json file holding exactly {"workload": "compute", "seconds": S} with 0 < S <= 3600.
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
FORMAT_HINT = (
    f'a .json input must be a compute workload, exactly {{"workload": "compute", "seconds": S}} '
    f"with 0 < S <= {MAX_COMPUTE_SECONDS}"
)


def parse_workload(path: Path, name: str) -> float:
    """The workload's seconds; InputError saying what a workload file looks like for anything else."""
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
        or raw["workload"] != "compute"
        or not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_COMPUTE_SECONDS
    ):
        raise InputError(f"{name} is not a compute workload; {FORMAT_HINT}")
    return float(seconds)


def run_workload(model: LoadedModel, seconds: float, seed: int = 0) -> tuple[int, np.ndarray]:
    """Forward batches of BATCH_ITEMS random inputs until `seconds` have passed (at least one batch).

    Returns the number of items passed forward and the last batch's probabilities.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.random((BATCH_ITEMS, *model.model_input.shape), dtype=np.float32)
    deadline = time.monotonic() + seconds
    items = 0
    while True:
        probs = predict(model, pixels, batch_size=BATCH_ITEMS)
        items += len(pixels)
        if time.monotonic() >= deadline:
            return items, probs
