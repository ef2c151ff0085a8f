"""predictions.csv: one row per input item, in input order: item, label, confidence[, prob_0..prob_K-1]."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

PREDICTIONS_NAME = "predictions.csv"
MAX_PROB_COLUMNS = 32  # wider models (e.g. 1000 classes) get label and confidence only


def write_predictions(path: Path, items: list[str], probs: np.ndarray) -> None:
    if len(items) != len(probs):
        raise ValueError(f"{len(items)} items but {len(probs)} predictions")
    classes = probs.shape[1]
    with_probs = classes <= MAX_PROB_COLUMNS
    labels = probs.argmax(axis=1)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        header = ["item", "label", "confidence"]
        if with_probs:
            header += [f"prob_{k}" for k in range(classes)]
        writer.writerow(header)
        for item, label, row in zip(items, labels, probs, strict=True):
            line = [item, int(label), f"{row[label]:.6f}"]
            if with_probs:
                line += [f"{p:.6f}" for p in row]
            writer.writerow(line)
