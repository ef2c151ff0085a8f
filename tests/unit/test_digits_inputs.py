"""The digits package's input decoding (examples/jobs/digits/digits_inputs.py), and the errors users see;
zip expansion, which the runtime does for every package (worker/items.py)."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker import items
from worker.errors import InputError as RuntimeInputError
from worker.items import expand_items

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "jobs" / "digits"))
import digits_inputs  # noqa: E402 - the package's own module, as its handler imports it
from digits_inputs import InputError, ModelInput, decode_input  # noqa: E402

DIGITS = ModelInput(channels=1, height=8, width=8, array_value_max=16.0, light_on_dark=True)
SAMPLES = Path(__file__).resolve().parents[2] / "samples"

# a "7": the top bar and a diagonal, on the 0-16 scale
SEVEN = np.zeros((8, 8))
SEVEN[1, 1:7] = 16
for row, col in zip(range(2, 8), (6, 5, 5, 4, 3, 3), strict=True):
    SEVEN[row, col] = 12


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def decode(path: Path, model_input: ModelInput = DIGITS):
    return decode_input(path, path.suffix.lower(), path.name, model_input)


def png(raw: np.ndarray, size: int = 64, dark_on_light: bool = False, mode: str = "L", fmt: str = "PNG"):
    gray = 255 - raw / 16 * 255 if dark_on_light else raw / 16 * 255
    img = Image.fromarray(np.rint(gray).astype(np.uint8), "L").resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    img.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


# --- images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dark_on_light", [False, True])
def test_png_either_polarity_decodes_to_light_ink_on_dark(tmp_path, dark_on_light):
    # GIVEN a 64x64 upscaled digit, white-on-black or black-on-white
    path = write(tmp_path, "seven.png", png(SEVEN, dark_on_light=dark_on_light))
    # WHEN decoded for the digits model
    decoded = decode(path)
    # THEN it is the original 8x8 digit on the 0..1 scale, background 0, full ink 1
    assert decoded.items == ["seven.png"]
    assert decoded.pixels.shape == (1, 1, 8, 8) and decoded.pixels.dtype == np.float32
    np.testing.assert_allclose(decoded.pixels[0, 0], SEVEN / 16, atol=0.01)


def test_rgb_jpeg_is_grayscaled_for_a_one_channel_model(tmp_path):
    path = write(tmp_path, "seven.JPG", png(SEVEN, size=96, dark_on_light=True, mode="RGB", fmt="JPEG"))
    decoded = decode(path)
    assert decoded.pixels.shape == (1, 1, 8, 8)
    assert np.abs(decoded.pixels[0, 0] - SEVEN / 16).mean() < 0.08


def test_image_for_foreign_model_is_resized_and_converted_without_inversion(tmp_path):
    foreign = ModelInput(channels=3, height=16, width=12)
    path = write(tmp_path, "x.png", png(SEVEN, size=40, dark_on_light=True))
    pixels = decode(path, foreign).pixels
    assert pixels.shape == (1, 3, 16, 12)
    assert pixels.max() == pytest.approx(1.0)
    assert pixels[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # white background kept: no inversion


def test_transparent_png_with_dark_ink_is_composited_on_white(tmp_path):
    ink = Image.new("LA", (32, 32), (0, 0))  # fully transparent
    for y in range(4, 28):
        ink.putpixel((16, y), (0, 255))  # opaque black stroke
    buffer = io.BytesIO()
    ink.save(buffer, format="PNG")
    pixels = decode(write(tmp_path, "stroke.png", buffer.getvalue())).pixels[0, 0]
    assert pixels[:, 4].max() == pytest.approx(1.0) and pixels[:, 0].max() == 0.0


def test_blank_image_decodes_to_zeros(tmp_path):
    pixels = decode(write(tmp_path, "blank.png", png(np.zeros((8, 8))))).pixels
    assert not pixels.any()


def test_corrupt_png_is_rejected(tmp_path):
    data = png(SEVEN)
    path = write(tmp_path, "broken.png", data[: len(data) // 2])
    with pytest.raises(InputError, match=r"broken.png is not a readable PNG image \(corrupt or truncated"):
        decode(path)


def test_content_must_match_the_extension(tmp_path):
    path = write(tmp_path, "photo.png", png(SEVEN, fmt="JPEG"))
    with pytest.raises(InputError, match=r"photo.png has the extension .png but is not a PNG image .*JPEG"):
        decode(path)


def test_garbage_with_image_extension_is_rejected(tmp_path):
    with pytest.raises(InputError, match=r"looks like unrecognised data"):
        decode(write(tmp_path, "x.jpg", b"hello, not an image"))


def test_too_many_pixels_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(digits_inputs, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match=r"64x64 pixels, over the 1,000-pixel limit"):
        decode(write(tmp_path, "big.png", png(SEVEN)))


@pytest.mark.parametrize("name", ["empty.png", "empty.csv", "empty.npy"])
def test_empty_file_is_rejected(tmp_path, name):
    with pytest.raises(InputError, match=rf"{name} is empty \(0 bytes\)"):
        decode(write(tmp_path, name, b""))


# --- CSV ----------------------------------------------------------------------------------------------


def csv_bytes(rows: list[list[float]]) -> bytes:
    return "".join(",".join(f"{v:g}" for v in row) + "\n" for row in rows).encode()


def test_csv_rows_are_items_in_order(tmp_path):
    rows = [SEVEN.ravel().tolist(), np.full(64, 8.0).tolist(), np.zeros(64).tolist()]
    decoded = decode(write(tmp_path, "input.csv", csv_bytes(rows) + b"\n"))
    assert decoded.items == ["row 1", "row 2", "row 3"]
    np.testing.assert_allclose(decoded.pixels[0, 0], SEVEN / 16)
    assert decoded.pixels[1].max() == pytest.approx(0.5)


def test_csv_row_with_63_values_names_the_row(tmp_path):
    rows = [np.zeros(64).tolist(), np.zeros(64).tolist(), np.zeros(63).tolist()]
    with pytest.raises(InputError) as caught:
        decode(write(tmp_path, "input.csv", csv_bytes(rows)))
    assert str(caught.value) == "input.csv row 3 has 63 values; expected 64 pixel values on the 0-16 scale"


def test_csv_header_is_rejected_with_a_hint(tmp_path):
    header = ",".join(f"pixel_{i}" for i in range(64)).encode() + b"\n"
    expected = r"row 1 column 1 is not a number \('pixel_0'\); the CSV must have no header"
    with pytest.raises(InputError, match=expected):
        decode(write(tmp_path, "input.csv", header + csv_bytes([np.zeros(64).tolist()])))


@pytest.mark.parametrize(
    ("value", "problem"), [(17, "has the value 17, outside 0-16"), (float("nan"), "NaN")]
)
def test_csv_values_off_the_scale_are_rejected(tmp_path, value, problem):
    row = np.zeros(64)
    row[5] = value
    with pytest.raises(InputError, match=rf"input.csv row 1 .*{problem}"):
        decode(write(tmp_path, "input.csv", csv_bytes([row.tolist()])))


def test_csv_that_is_binary_or_blank_is_rejected(tmp_path):
    with pytest.raises(InputError, match="not a text CSV"):
        decode(write(tmp_path, "a.csv", b"1,2\x00,3"))
    with pytest.raises(InputError, match="has no data rows"):
        decode(write(tmp_path, "b.csv", b"\n \n"))
    with pytest.raises(InputError, match=r"is not a CSV text .*zip archive|but is not CSV text"):
        decode(write(tmp_path, "c.csv", make_zip([("a.png", png(SEVEN))])))


# --- .npy ---------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("shape", "count"), [((64,), 1), ((3, 64), 3), ((8, 8), 1), ((2, 8, 8), 2), ((4, 1, 8, 8), 4)]
)
def test_npy_accepted_shapes(tmp_path, shape, count):
    array = np.resize(SEVEN, shape).astype(np.uint8)
    decoded = decode(write(tmp_path, "input.npy", npy_bytes(array)))
    assert decoded.items == [f"row {i + 1}" for i in range(count)]
    assert decoded.pixels.shape == (count, 1, 8, 8)
    assert decoded.pixels.max() == pytest.approx(1.0)


def test_npy_wrong_shape_lists_the_accepted_ones(tmp_path):
    expected = r"has shape \(2, 63\); expected one of \(64,\), \(N, 64\), \(8, 8\), \(N, 8, 8\)"
    with pytest.raises(InputError, match=expected):
        decode(write(tmp_path, "input.npy", npy_bytes(np.zeros((2, 63)))))


def test_npy_with_pickled_objects_is_refused(tmp_path):
    data = npy_bytes(np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"holds Python objects \(pickled\)"):
        decode(write(tmp_path, "input.npy", data))


def test_npy_problems(tmp_path):
    with pytest.raises(InputError, match="item 2 has the value -1"):
        decode(write(tmp_path, "a.npy", npy_bytes(np.array([np.zeros(64), -np.ones(64)]))))
    with pytest.raises(InputError, match="contains no items"):
        decode(write(tmp_path, "b.npy", npy_bytes(np.zeros((0, 64)))))
    with pytest.raises(InputError, match="expected a numeric"):
        decode(write(tmp_path, "c.npy", npy_bytes(np.array(["a"] * 64))))
    with pytest.raises(InputError, match="not a readable .npy file"):
        decode(write(tmp_path, "d.npy", npy_bytes(np.zeros(64))[:100]))


# --- zip ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "..\\evil.png", "C:/x.png"]
)
def test_zip_traversal_names_are_rejected(tmp_path, entry):
    # a zip upload is expanded by the runtime (worker/items.py) for every package, before the handler sees it
    data = make_zip([("ok.png", png(SEVEN)), (entry, png(SEVEN))])
    with pytest.raises(RuntimeInputError, match="has an absolute or '..' path"):
        expand_items(write(tmp_path, "batch.zip", data), "batch.zip", tmp_path / "items")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["batch.zip"]  # nothing extracted


def test_zip_limits(tmp_path, monkeypatch):
    data = make_zip([(f"{i}.png", png(SEVEN)) for i in range(3)])
    monkeypatch.setattr(items, "MAX_ZIP_ENTRIES", 2)
    with pytest.raises(RuntimeInputError, match="has 3 entries, over the 2 limit"):
        expand_items(write(tmp_path, "a.zip", data), "a.zip", tmp_path / "a")
    monkeypatch.setattr(items, "MAX_ZIP_ENTRIES", 10)
    monkeypatch.setattr(items, "MAX_ZIP_UNCOMPRESSED_BYTES", len(png(SEVEN)) * 2)
    with pytest.raises(RuntimeInputError, match="uncompressed contents exceed"):
        expand_items(write(tmp_path, "b.zip", data), "b.zip", tmp_path / "b")


# --- bundled samples and the spec ---------------------------------------------------------------------


def test_every_bundled_sample_decodes_to_its_labelled_item_count(tmp_path):
    labels = json.loads((SAMPLES / "labels.json").read_text())
    for name, truth in labels.items():
        expanded = expand_items(SAMPLES / name, name, tmp_path / name)  # a zip: one item per member
        assert sum(len(decode(Path(item.path)).items) for item in expanded) == len(truth), name
