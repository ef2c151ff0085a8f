"""Decode one input item (PNG/JPEG, .npy, .csv) into model-ready pixels N x C x H x W.

The format must agree by extension and by content. Every failure is an InputError whose message names
the item (and row) and says what was expected: it ends up in the job's errors.jsonl.
"""

from __future__ import annotations

import csv
import io
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class InputError(ValueError):
    """The item cannot be used; the message says why and what to upload instead."""


def printable(text: str, limit: int = 200) -> str:
    """Hostile text (names) made safe for one-line messages: no control characters, bounded."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."

MAX_INPUT_BYTES = 100 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
MAX_PIXELS_ARRAY_BYTES = 2 * 1024 * 1024 * 1024  # the decoded float32 batch held in memory

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# extension -> format; the file's content must be of the same format
FORMAT_BY_EXTENSION = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".npy": "npy",
    ".csv": "csv",
}
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}  # our format -> PIL's Image.format
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x93NUMPY", "npy"),
    (b"PK\x03\x04", "zip"),
)
_FORMAT_NAMES = {
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "npy": "a NumPy .npy array",
    "zip": "a zip archive",
    "csv": "CSV text",
}
_CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_MIN_CONTRAST = 0.05  # below this an image is blank: all background


@dataclass(frozen=True)
class ModelInput:
    """What the model wants to be fed (handler.py's setup() reads each field from the TorchScript model)."""

    channels: int
    height: int
    width: int
    array_value_max: float | None = None  # .npy/.csv values are on 0..this scale and divided by it
    light_on_dark: bool = False  # images become light ink on a dark background, contrast-stretched

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def values_per_item(self) -> int:
        return self.channels * self.height * self.width

    def describe_values(self) -> str:
        """E.g. '64 pixel values on the 0-16 scale' (used in messages about rows and arrays)."""
        if self.array_value_max is not None:
            return f"{self.values_per_item} pixel values on the 0-{self.array_value_max:g} scale"
        c, h, w = self.shape
        return f"{self.values_per_item} values ({c}x{h}x{w})"


@dataclass(frozen=True)
class Decoded:
    items: list[str]  # one name per item, in input order
    pixels: np.ndarray  # float32, N x C x H x W, ready for the model


def sniff_format(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def decode_input(path: Path, ext: str, name: str, model_input: ModelInput) -> Decoded:
    """Decode the item at path; ext: its lower-case extension (a key of FORMAT_BY_EXTENSION)."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{name} is empty (0 bytes); upload a file with at least one item")
    if size > MAX_INPUT_BYTES:
        raise InputError(f"{name} is larger than the {MAX_INPUT_BYTES // 2**20} MiB limit; split it")
    fmt = FORMAT_BY_EXTENSION[ext]
    with path.open("rb") as fh:
        head = fh.read(16)
    _check_content(name, ext, fmt, sniff_format(head))
    if fmt in IMAGE_FORMATS:
        pixels = _decode_image(path.read_bytes(), fmt, name, model_input)
        return Decoded([name], pixels[np.newaxis])
    if fmt == "npy":
        return _decode_npy(path, name, model_input)
    if fmt == "csv":
        return _decode_csv(path.read_bytes(), name, model_input)
    raise InputError(f"{name}: {ext} is not a format of this job")


def _check_content(name: str, ext: str, fmt: str, sniffed: str | None) -> None:
    if sniffed == fmt or (fmt == "csv" and sniffed is None):
        return
    found = _FORMAT_NAMES[sniffed] if sniffed else "unrecognised data"
    raise InputError(
        f"{name} has the extension {ext} but is not {_FORMAT_NAMES[fmt]} (its content looks like {found}); "
        "upload a valid file or fix its extension"
    )


# --- images -------------------------------------------------------------------------------------------


def _decode_image(data: bytes, fmt: str, name: str, model_input: ModelInput) -> np.ndarray:
    kind = IMAGE_FORMATS[fmt]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format != kind:
                    raise InputError(f"{name} is not a {kind} image (it is {img.format}); fix its extension")
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(_too_many_pixels(name, width, height))
                img.load()
                return image_to_pixels(ImageOps.exif_transpose(img), model_input, name)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name} has too many pixels (limit {MAX_IMAGE_PIXELS:,}); downscale it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise InputError(f"{name} is not a readable {kind} image (corrupt or truncated: {exc})") from exc


def image_to_pixels(img: Image.Image, model_input: ModelInput, name: str) -> np.ndarray:
    """Resize to the model's H x W and convert to its C channels, values 0..1, shape C x H x W.

    For light-on-dark models (the digits CNN) the image is inverted when its border is light (dark ink on
    paper), then contrast-stretched so the background is 0 and the brightest ink is 1.
    """
    mode = _CHANNEL_MODES.get(model_input.channels)
    if mode is None:
        raise InputError(
            f"{name}: the model expects {model_input.channels}-channel input; images can only feed "
            "models with 1, 3 or 4 channels (send a .npy array instead)"
        )
    img = _flatten_to_8bit(img)
    target = (model_input.width, model_input.height)
    down = img.width >= target[0] and img.height >= target[1]
    resample = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
    resized = img.convert(mode).resize(target, resample=resample)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    pixels = pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if model_input.light_on_dark:
        background = _border_level(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
        if background > 0.5:
            pixels, background = 1.0 - pixels, 1.0 - background
        contrast = float(pixels.max()) - background
        if contrast < _MIN_CONTRAST:
            pixels = np.zeros_like(pixels)
        else:
            pixels = np.clip((pixels - background) / contrast, 0.0, 1.0)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _flatten_to_8bit(img: Image.Image) -> Image.Image:
    """Composite transparency onto white and bring 16-bit/float images to 8 bits."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")
    return img


def _border_level(gray: np.ndarray) -> float:
    """Median brightness of a frame about 5% wide: the background, whatever the ink does."""
    h, w = gray.shape
    band = max(1, round(min(h, w) * 0.05))
    if h <= 2 * band or w <= 2 * band:
        return float(np.median(gray))
    frame = np.concatenate(
        [
            gray[:band].ravel(),
            gray[-band:].ravel(),
            gray[band:-band, :band].ravel(),
            gray[band:-band, -band:].ravel(),
        ]
    )
    return float(np.median(frame))


def _too_many_pixels(name: str, width: int, height: int) -> str:
    return f"{name} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit; downscale it"


# --- arrays (.npy, .csv) ------------------------------------------------------------------------------


def _decode_npy(path: Path, name: str, model_input: ModelInput) -> Decoded:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(
                f"{name} holds Python objects (pickled), which are not accepted; save a numeric array "
                "with np.save(path, array.astype('float32'))"
            ) from exc
        raise InputError(f"{name} is not a readable .npy file (corrupt or truncated: {exc})") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{name} is not a readable .npy file (corrupt or truncated: {exc})") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        dtype = getattr(array, "dtype", "?")
        raise InputError(f"{name} has dtype {dtype}; expected a numeric (int or float) array")
    batch = _shape_batch(array, name, model_input)
    values = batch.reshape(len(batch), -1)
    bad = _rows_with_problems(values, model_input)
    if bad.any():  # checked for all rows at once; the message names the first bad one
        index = int(np.argmax(bad))
        problem = _row_problem(values[index].astype(np.float64), model_input)
        raise InputError(f"{name} item {index + 1} {problem}; expected {model_input.describe_values()}")
    return Decoded([f"row {i + 1}" for i in range(len(batch))], _scale(batch, model_input))


def _rows_with_problems(values: np.ndarray, model_input: ModelInput) -> np.ndarray:
    """A boolean per row (N x values): True where _row_problem would find something."""
    bad = ~np.isfinite(values).all(axis=1)
    top = model_input.array_value_max
    if top is not None:
        with np.errstate(invalid="ignore"):
            bad |= ((values < 0) | (values > top)).any(axis=1)
    return bad


def _shape_batch(array: np.ndarray, name: str, model_input: ModelInput) -> np.ndarray:
    """Accept (CHW,), (N, CHW), (C, H, W) and (N, C, H, W); for 1 channel also (H, W) and (N, H, W)."""
    c, h, w = model_input.shape
    flat = c * h * w
    shape = array.shape
    if shape == (flat,) or shape == (c, h, w) or (c == 1 and shape == (h, w)):
        batch = array.reshape(1, c, h, w)
    elif (array.ndim == 2 and shape[1] == flat) or (array.ndim == 4 and shape[1:] == (c, h, w)):
        batch = array.reshape(-1, c, h, w)
    elif c == 1 and array.ndim == 3 and shape[1:] == (h, w):
        batch = array.reshape(-1, c, h, w)
    else:
        accepted = [(flat,), ("N", flat), (c, h, w), ("N", c, h, w)]
        if c == 1:
            accepted = [(flat,), ("N", flat), (h, w), ("N", h, w), ("N", c, h, w)]
        listed = ", ".join(str(s).replace("'", "") for s in accepted)
        raise InputError(f"{name} has shape {shape}; expected one of {listed}")
    if len(batch) == 0:
        raise InputError(f"{name} contains no items (shape {shape}); upload at least one")
    _check_batch_size(len(batch), name, model_input)
    return batch


def _decode_csv(data: bytes, name: str, model_input: ModelInput) -> Decoded:
    if b"\x00" in data:
        raise InputError(f"{name} is not a text CSV file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as plain CSV"
        ) from exc
    expected = model_input.describe_values()
    rows: list[np.ndarray] = []
    items: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    for cells in reader:
        if not cells or all(not cell.strip() for cell in cells):
            continue  # blank line
        where = f"{name} row {reader.line_num}"
        if len(cells) != model_input.values_per_item:
            raise InputError(f"{where} has {len(cells)} values; expected {expected}")
        try:
            row = np.asarray(cells, dtype=np.float64)
        except ValueError:
            column, cell = _first_non_number(cells)
            raise InputError(
                f"{where} column {column} is not a number ({printable(cell.strip(), 40)!r}); "
                f"the CSV must have no header and {expected} per row"
            ) from None
        problem = _row_problem(row, model_input)
        if problem:
            raise InputError(f"{where} {problem}; expected {expected}")
        rows.append(row)
        items.append(f"row {reader.line_num}")
        if len(rows) % 10_000 == 0:
            _check_batch_size(len(rows), name, model_input)
    if not rows:
        raise InputError(f"{name} has no data rows; expected one row of {expected} per item")
    _check_batch_size(len(rows), name, model_input)
    batch = np.stack(rows).reshape(-1, *model_input.shape)
    return Decoded(items, _scale(batch, model_input))


def _first_non_number(cells: list[str]) -> tuple[int, str]:
    for column, cell in enumerate(cells, start=1):
        try:
            float(cell)
        except ValueError:
            return column, cell
    return 1, cells[0]


def _row_problem(row: np.ndarray, model_input: ModelInput) -> str | None:
    if not np.all(np.isfinite(row)):
        return "contains NaN or infinity"
    top = model_input.array_value_max
    if top is not None and (row.min(initial=0) < 0 or row.max(initial=0) > top):
        bad = row[(row < 0) | (row > top)][0]
        return f"has the value {bad:g}, outside 0-{top:g}"
    return None


def _scale(batch: np.ndarray, model_input: ModelInput) -> np.ndarray:
    pixels = batch.astype(np.float32)
    if model_input.array_value_max is not None:
        pixels /= np.float32(model_input.array_value_max)
    return np.ascontiguousarray(pixels)


def _check_batch_size(count: int, name: str, model_input: ModelInput) -> None:
    size_bytes = count * model_input.values_per_item * 4
    if size_bytes > MAX_PIXELS_ARRAY_BYTES:
        raise InputError(
            f"{name} has at least {count:,} items, {size_bytes / 2**30:.1f} GiB once decoded, over the "
            f"{MAX_PIXELS_ARRAY_BYTES / 2**30:.0f} GiB limit; split it into smaller files"
        )
