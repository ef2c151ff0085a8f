"""Train the digits CNN on scikit-learn's bundled digits and save it as TorchScript.

Writes build/model/digits-cnn.pt (the model the job runs by default) and digits-cnn.json
(accuracy, input shape, sha256). Deterministic, CPU only, no download; skips when up to date.

The TorchScript module carries what the job needs to feed it (see worker/model.py):
  input_shape      [1, 8, 8]        (C, H, W)
  array_value_max  16.0             .npy/.csv pixel values are on the 0-16 scale; the job divides by it
  image_polarity   "light-on-dark"  images are converted to light ink on a dark background, 0..1
"""

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "build" / "model" / "digits-cnn.pt"
SEED = 0
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
DIGITS_VALUE_MAX = 16.0
MIN_ACCURACY = 0.97


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits; outputs logits for the 10 classes."""

    input_shape: list[int]
    array_value_max: float
    image_polarity: str

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = [1, 8, 8]
        self.array_value_max = DIGITS_VALUE_MAX
        self.image_polarity = "light-on-dark"
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 x 4 x 4
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 64 x 2 x 2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/test split shared with scripts/make_samples.py; X on the raw 0-16 scale."""
    digits = load_digits()
    return train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((x / DIGITS_VALUE_MAX).astype(np.float32)).reshape(-1, 1, 8, 8)


def train() -> tuple[nn.Module, float]:
    """Train with a fixed seed; return the model (eval mode) and its held-out accuracy."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = load_split()
    xt, yt = to_tensor(x_train), torch.from_numpy(y_train.astype(np.int64))
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    with torch.inference_mode():
        predicted = model(to_tensor(x_test)).argmax(dim=1).numpy()
    return model, float((predicted == y_test).mean())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_up_to_date(out: Path) -> bool:
    meta = out.with_suffix(".json")
    if not (out.exists() and meta.exists()):
        return False
    return out.stat().st_mtime > Path(__file__).stat().st_mtime


def save(model: nn.Module, accuracy: float, out: Path) -> dict:
    """Write the TorchScript file and its metadata atomically (concurrent builds may race)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # a file name would leak into the archive's folder name
    torch.jit.save(torch.jit.script(model), buffer)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    meta = {
        "accuracy": round(accuracy, 4),
        "input_shape": [1, 8, 8],
        "classes": 10,
        "array_value_max": DIGITS_VALUE_MAX,
        "image_polarity": "light-on-dark",
        "sha256": sha256_file(tmp),
    }
    meta_tmp = out.with_name(f".{out.stem}.{os.getpid()}.json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out)
    os.replace(meta_tmp, out.with_suffix(".json"))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="TorchScript output path")
    parser.add_argument("--force", action="store_true", help="retrain even when the output is up to date")
    args = parser.parse_args(argv)
    out: Path = args.out
    if not args.force and is_up_to_date(out):
        meta = json.loads(out.with_suffix(".json").read_text())
        print(f"{out} is up to date (held-out accuracy {meta['accuracy']:.4f}); --force retrains")
        return 0
    started = time.monotonic()
    model, accuracy = train()
    meta = save(model, accuracy, out)
    elapsed = time.monotonic() - started
    print(f"held-out accuracy {accuracy:.4f}; trained in {elapsed:.1f} s")
    print(f"wrote {out} (sha256 {meta['sha256']})")
    if accuracy < MIN_ACCURACY:
        print(f"accuracy {accuracy:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
