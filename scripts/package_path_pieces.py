"""The job package path in pieces, python only, for docs/bench.md ("The job package path").

`.venv/bin/python scripts/package_path_pieces.py REPO [REPS]`: REPO is a checkout whose worker/ and digits
package are timed (this one, or a `git worktree` of an older commit), on a 100,000-row .npy (worker vs bare)
and a zip of 2000 PNGs (byo runner vs direct). The forward is replaced by fixed probabilities, so torch's
threads on shared cores do not drown the figures: what is left is decode + results rows/tables (process()
called directly, and driven by the handler process's run_process: inference_s) and writing results.csv
(results_s). Min and median of REPS (default 5), seconds.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path


def main() -> None:
    repo = Path(sys.argv[1]).resolve()
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    package = repo / "examples" / "jobs" / "digits"
    sys.path[:0] = [str(repo), str(package)]
    os.chdir(package)
    import numpy as np
    from digits_inputs import ModelInput
    from handler import Digits
    from sklearn.datasets import load_digits

    from worker.handler_context import Item, JobContext
    from worker.handler_host import finish_job, run_process
    from worker.items import expand_items

    scratch = Path(tempfile.mkdtemp(prefix="pieces-"))
    data = np.resize(load_digits().data.astype(np.uint8), (100_000, 64)).reshape(100_000, 8, 8)
    np.save(scratch / "x.npy", data)
    fixed = np.random.default_rng(0).dirichlet(np.ones(10), 100_000).astype(np.float32)
    handler = Digits()
    handler.model_input = ModelInput(1, 8, 8, array_value_max=16.0, light_on_dark=True)
    handler.predict = lambda pixels: fixed[: len(pixels)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(2000):
            archive.writestr(f"img/{n:05d}.png", (repo / "samples" / "digit-3.png").read_bytes())
    (scratch / "in.zip").write_bytes(buffer.getvalue())
    inputs = {"npy": [Item("bench/x.npy", scratch / "x.npy")],
              "png": [Item(i.name, i.path) for i in expand_items(scratch / "in.zip", "in.zip", scratch / "items")]}

    def context() -> JobContext:
        return JobContext(package, logging.getLogger("pieces"), job_id="j", params={}, output_dir=scratch / "out")

    times: dict[str, list[float]] = {}

    def timed(key: str, run):
        started = time.perf_counter()
        result = run()
        times.setdefault(key, []).append(time.perf_counter() - started)
        return result

    for _ in range(reps):
        for label, items in inputs.items():
            ctx = context()
            timed(f"{label}: process() called directly", lambda i=items: list(handler.process(i, context())))
            rows, error = timed(f"{label}: run_process (inference_s)", lambda i=items, c=ctx: run_process(handler, i, c))
            assert error is None, error
            results = scratch / f"{label}.csv"
            timed(f"{label}: results.csv + errors.jsonl (results_s)",
                  lambda i=items, c=ctx, r=rows, out=results: finish_job(i, c, r, out, scratch / "errors.jsonl"))
    print(f"{repo}: load average {os.getloadavg()[0]:.1f}, min / median of {reps}, seconds, forward excluded")
    for key, values in times.items():
        print(f"  {key:45s} {min(values):.3f} / {sorted(values)[len(values) // 2]:.3f}")


if __name__ == "__main__":
    main()
