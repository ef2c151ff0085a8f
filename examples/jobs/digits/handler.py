"""The default job: a small CNN classifying handwritten digits (8x8), as a job package.

Items: PNG/JPEG images (one row each), .npy arrays and CSV files of 64 pixel values on the 0-16 scale
(one row per array item / CSV row, with a `row` column), and compute-only workloads
({"workload": "compute" or "hold", "seconds": S} in a .json) for load and cost tests.
The weights (weights/digits-cnn.pt, TorchScript) are trained by scripts/train_model.py at build time.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from digits_inputs import FORMAT_BY_EXTENSION, InputError, ModelInput, decode_input

WEIGHTS = Path("weights") / "digits-cnn.pt"
BATCH_SIZE = 256  # CPU: the measured best
CUDA_BATCH_SIZE = 1024  # a 16 GB GPU holds far more of a small CNN; larger batches amortise the launches
MAX_COMPUTE_SECONDS = 3600
WORKLOAD_HINT = (
    'a .json item must be a compute workload, exactly {"workload": "compute" or "hold", "seconds": S} '
    f"with 0 < S <= {MAX_COMPUTE_SECONDS}"
)


class Digits:
    def setup(self, ctx) -> None:
        self.device = torch.device(ctx.device)
        path = Path(ctx.package_dir) / WEIGHTS
        self.model = torch.jit.load(str(path), map_location=self.device).eval()
        shape = [int(v) for v in self.model.input_shape]
        polarity = getattr(self.model, "image_polarity", "")
        self.model_input = ModelInput(*shape, array_value_max=float(self.model.array_value_max),
                                      light_on_dark=polarity == "light-on-dark")
        # TorchScript's profiling executor optimises the graph during the first forwards: run them here, at
        # the job's batch size, so the first job (and a prewarmed instance's first) does not pay for them.
        warm_up = np.zeros((CUDA_BATCH_SIZE if self.device.type == "cuda" else BATCH_SIZE, *shape), np.float32)
        for _ in range(2):
            self.predict(warm_up)
        ctx.log.info(f"model loaded on {self.device}: input {shape}")

    def process(self, items, ctx):
        """Decode every item (a bad one fails alone), classify them all in large batches; one row per image,
        one table (a row per line) per .npy / .csv item."""
        decoded = []  # (item, row names or None, pixels)
        for item in items:
            ext = Path(item.path).suffix.lower()
            with ctx.item(item):
                if ext == ".json":
                    yield item, self._workload(item)
                    continue
                if ext not in FORMAT_BY_EXTENSION:
                    raise InputError(f"{item.name} is not a .png/.jpg/.jpeg, .npy or .csv item")
                result = decode_input(Path(item.path), ext, item.name, self.model_input)
                rows = None if ext in (".png", ".jpg", ".jpeg") else result.items
                decoded.append((item, rows, result.pixels))
        if not decoded:
            return
        arrays = [pixels for _, _, pixels in decoded]
        probs = self.predict(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))  # one .npy: no copy
        # An image is one row: a dict (formatted in bulk for all images at once). An array or CSV item is one
        # row per line, numbered in a `row` column: a table, so no Python object is built per row.
        starts = np.cumsum([0] + [len(pixels) for _, _, pixels in decoded[:-1]]).tolist()
        image_lines = np.array([start for start, (_, rows, _) in zip(starts, decoded, strict=True) if rows is None], np.intp)
        images = iter(_prediction_rows(probs[image_lines]))
        for start, (item, rows, pixels) in zip(starts, decoded, strict=True):
            if rows is None:
                yield item, next(images)
            else:
                part = probs[start : start + len(pixels)]
                yield item, ctx.table({"row": range(1, len(part) + 1), **_prediction_columns(part)}, decimals=6)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities, N x 10, in batches on the model's device (float16 autocast on CUDA).

        Each batch's probabilities are copied into one array made for all N: kept as one small array per
        batch they pinned the heap between the batches' activations, so a process's first large job grew it
        by ~180 MB of fresh pages (100,000 rows: ~45,000 page faults, ~0.1 s) that later jobs then reused."""
        cuda = self.device.type == "cuda"
        size = CUDA_BATCH_SIZE if cuda else BATCH_SIZE
        probs = np.empty((len(pixels), 0), np.float32)
        precision = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            for start in range(0, len(pixels), size):
                batch = torch.from_numpy(pixels[start : start + size])
                batch = batch.pin_memory().to(self.device, non_blocking=True) if cuda else batch
                batch_probs = torch.softmax(self.model(batch).float(), dim=1).cpu().numpy()
                if start == 0:
                    probs = np.empty((len(pixels), batch_probs.shape[1]), np.float32)
                probs[start : start + len(batch_probs)] = batch_probs
        return probs

    def _workload(self, item) -> dict:
        """Forward passes on random data ("compute") or one pass then an idle wait ("hold") for S seconds."""
        kind, seconds = _parse_workload(Path(item.path), item.name)
        pixels = np.random.default_rng(0).random((64, *self.model_input.shape), dtype=np.float32)
        deadline, passes = time.monotonic() + seconds, 0
        while True:
            probs = self.predict(pixels)
            passes += len(pixels)
            if kind == "hold":
                time.sleep(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return {"workload": kind, "forward_items": passes, **_prediction(probs[0])}


def _prediction(probs: np.ndarray) -> dict:
    return _prediction_rows(probs[np.newaxis])[0]


def _prediction_rows(probs: np.ndarray) -> list[dict]:
    """One row per line of class probabilities (N x K): label, confidence, prob_0..prob_K-1, six decimals.
    Every value formatted by one % from Python floats (a NumPy scalar formatted one by one costs ten times
    more); an image costs ~2 µs here against ~12 µs as a one-row table (a copy of each of its 12 columns)."""
    columns = ["label", "confidence", *(f"prob_{k}" for k in range(probs.shape[1]))]
    row_format = ",".join(["%.6f"] * probs.shape[1])
    text = "\n".join([row_format] * len(probs)) % tuple(probs.ravel().tolist())
    lines = (line.split(",") for line in text.split("\n")) if len(probs) else ()
    return [dict(zip(columns, [label, texts[label], *texts], strict=True))
            for label, texts in zip(probs.argmax(axis=1).tolist(), lines, strict=True)]


def _prediction_columns(probs: np.ndarray) -> dict[str, np.ndarray]:
    """The results columns of N lines of class probabilities (N x K): label, confidence, prob_0..prob_K-1."""
    labels = probs.argmax(axis=1)
    return {"label": labels, "confidence": probs[np.arange(len(probs)), labels],
            **{f"prob_{k}": probs[:, k] for k in range(probs.shape[1])}}


def _parse_workload(path: Path, name: str) -> tuple[str, float]:
    data = path.read_bytes()[:4097]
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise InputError(f"{name} is not valid JSON ({exc}); {WORKLOAD_HINT}") from exc
    seconds = raw.get("seconds") if isinstance(raw, dict) else None
    if (
        len(data) > 4096
        or not isinstance(raw, dict)
        or set(raw) != {"workload", "seconds"}
        or raw["workload"] not in ("compute", "hold")
        or not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_COMPUTE_SECONDS
    ):
        raise InputError(f"{name} is not a compute workload; {WORKLOAD_HINT}")
    return raw["workload"], float(seconds)
