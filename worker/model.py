"""Fetch (with a local cache), load and run a TorchScript classifier.

What the model wants to be fed (ModelInput) comes from, in order:
1. attributes of the TorchScript module: `input_shape` [C, H, W] (required), `array_value_max` (float;
   .npy/.csv values are divided by it) and `image_polarity` ("light-on-dark": images are inverted to light
   ink on a dark background) - scripts/train_model.py embeds all three;
2. a sidecar JSON next to the model, same key with .json instead of the extension
   (s3://b/models/foo.pt -> s3://b/models/foo.json), with the same three fields;
3. otherwise the job fails with a message saying how to declare the shape. We do not guess by probing.
Outputs are treated as logits: softmax over dimension 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.errors import ModelError
from worker.inputs import ModelInput
from worker.spec import parse_s3_uri
from worker.storage import ObjectInfo, Storage

BATCH_SIZE = 256  # CPU
CUDA_BATCH_SIZE = 1024  # a 16 GB GPU holds far more of a small CNN; larger batches amortise the launches
MAX_SIDECAR_BYTES = 64 * 1024
MAX_INPUT_SIDE = 8192
POLARITY_LIGHT_ON_DARK = "light-on-dark"

logger = logging.getLogger("worker")


@dataclass(frozen=True)
class LoadedModel:
    module: Any  # torch.jit.ScriptModule
    device: torch.device
    model_input: ModelInput
    input_source: str  # "embedded" or the sidecar's s3:// URI


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelCache:
    """Models loaded in this process, per (model_uri, ETag): the jobs of a batch load each model once."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    def get(self, uri: str, storage: Storage) -> LoadedModel:
        bucket, key = parse_s3_uri(uri)
        info = storage.head(bucket, key)
        loaded = self._loaded.get((uri, info.etag))
        if loaded is None:
            loaded = load_model(fetch_model(uri, self.cache_dir, storage, info), uri, storage)
            self._loaded[(uri, info.etag)] = loaded
        else:
            logger.info("model already loaded", extra={"model_uri": uri, "etag": info.etag})
        return loaded


def fetch_model(uri: str, cache_dir: Path, storage: Storage, info: ObjectInfo | None = None) -> Path:
    """The model file, from cache_dir when the same URI with the same ETag was downloaded before.

    `info` is the model object's head when the caller has it already.
    """
    bucket, key = parse_s3_uri(uri)
    info = info or storage.head(bucket, key)
    cache_key = hashlib.sha256(f"{uri}\n{info.etag}".encode()).hexdigest()
    path = cache_dir / f"{cache_key}.pt"
    if path.exists():
        logger.info("model cache hit", extra={"model_uri": uri, "etag": info.etag})
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    storage.download(bucket, key, path)
    logger.info("model downloaded", extra={"model_uri": uri, "etag": info.etag, "bytes": info.size_bytes})
    return path


def load_model(path: Path, uri: str, storage: Storage, device: torch.device | None = None) -> LoadedModel:
    device = device or select_device()
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or zip errors for foreign files
        raise ModelError(
            f"model {uri} cannot be loaded as TorchScript ({type(exc).__name__}: {str(exc)[:300]}); "
            "export it with torch.jit.script(model).save(path) or torch.jit.trace"
        ) from exc
    module.eval()
    embedded = _embedded_metadata(module)
    if embedded.get("input_shape") is not None:
        return LoadedModel(module, device, model_input_from_metadata(embedded, f"model {uri}"), "embedded")
    sidecar_uri, sidecar = _sidecar_metadata(uri, storage)
    if sidecar is not None:
        return LoadedModel(module, device, model_input_from_metadata(sidecar, sidecar_uri), sidecar_uri)
    raise ModelError(
        f"model {uri} does not declare its input shape; give the TorchScript module an attribute "
        f"input_shape = [C, H, W] or upload {sidecar_uri} with {{\"input_shape\": [C, H, W]}}"
    )


def model_input_from_metadata(meta: dict[str, Any], origin: str) -> ModelInput:
    shape = meta.get("input_shape")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INPUT_SIDE for v in shape)
    ):
        raise ModelError(
            f"{origin} declares input_shape {shape!r:.100}; expected [C, H, W] positive integers"
        )
    top = meta.get("array_value_max")
    if top is not None and (
        not isinstance(top, (int, float)) or isinstance(top, bool) or not math.isfinite(top) or top <= 0
    ):
        raise ModelError(f"{origin} declares array_value_max {top!r:.100}; expected a positive number")
    polarity = meta.get("image_polarity")
    return ModelInput(
        channels=shape[0],
        height=shape[1],
        width=shape[2],
        array_value_max=float(top) if top is not None else None,
        light_on_dark=polarity == POLARITY_LIGHT_ON_DARK,
    )


def predict(model: LoadedModel, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities, N x classes (float32), computed in batches on the model's device.

    On CUDA each batch goes through pinned memory with a non-blocking copy, and the forward runs under
    float16 autocast (probabilities are computed in float32). On CPU, 256 items a batch is the measured best.
    """
    cuda = model.device.type == "cuda"
    batch_size = batch_size or (CUDA_BATCH_SIZE if cuda else BATCH_SIZE)
    outputs: list[np.ndarray] = []
    precision = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    with torch.inference_mode(), precision:
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(pixels[start : start + batch_size])
            batch = batch.pin_memory().to(model.device, non_blocking=True) if cuda else batch
            try:
                logits = _logits(model.module(batch))
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(
                    f"the model failed on input of shape {tuple(batch.shape)} "
                    f"({type(exc).__name__}: {str(exc)[:300]}); check that its input shape "
                    f"{list(model.model_input.shape)} (from {model.input_source}) is right"
                ) from exc
            if logits.ndim != 2 or logits.shape[0] != len(batch) or logits.shape[1] < 1:
                raise ModelError(
                    f"the model returned shape {tuple(logits.shape)} for {len(batch)} items; "
                    "expected (items, classes) logits"
                )
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            if not np.all(np.isfinite(probs)):
                raise ModelError("the model returned NaN or infinite outputs")
            outputs.append(probs)
    return np.concatenate(outputs)


def _logits(output: Any) -> torch.Tensor:
    """A tensor, or the first element of a tuple/list, or a dict's "logits"."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and "logits" in output:
        output = output["logits"]
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"the model returned {type(output).__name__}; expected a tensor of logits")
    return output


def _embedded_metadata(module: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name in ("input_shape", "array_value_max", "image_polarity"):
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        meta[name] = list(value) if isinstance(value, tuple) else value
    return meta


def _sidecar_metadata(uri: str, storage: Storage) -> tuple[str, dict[str, Any] | None]:
    bucket, key = parse_s3_uri(uri)
    sidecar_key = posixpath.splitext(key)[0] + ".json"
    sidecar_uri = f"s3://{bucket}/{sidecar_key}"
    if sidecar_key == key:
        return sidecar_uri, None
    data = storage.get_optional(bucket, sidecar_key, MAX_SIDECAR_BYTES)
    if data is None:
        return sidecar_uri, None
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{sidecar_uri} is not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"{sidecar_uri} must be a JSON object with input_shape [C, H, W]")
    logger.info("model metadata from sidecar", extra={"sidecar_uri": sidecar_uri})
    return sidecar_uri, meta
