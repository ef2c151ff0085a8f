"""worker.inputs and worker.spec: decoding every input format, and the errors users see."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker import inputs
from worker.errors import InputError, SpecError
from worker.inputs import ModelInput, decode_input, display_name, input_extension
from worker.spec import parse_launch_request, parse_spec

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
    return decode_input(path, input_extension(path.name), path.name, model_input)


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
    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match=r"64x64 pixels, over the 1,000-pixel limit"):
        decode(write(tmp_path, "big.png", png(SEVEN)))


@pytest.mark.parametrize("name", ["empty.png", "empty.csv", "empty.npy", "empty.zip"])
def test_empty_file_is_rejected(tmp_path, name):
    with pytest.raises(InputError, match=rf"{name} is empty \(0 bytes\)"):
        decode(write(tmp_path, name, b""))


@pytest.mark.parametrize("key", ["notes.txt", "archive.tar.gz", "noext", "dir/", "x.npz", "x.png.exe"])
def test_unsupported_extension_is_rejected_before_download(key):
    with pytest.raises(InputError, match="unsupported file type"):
        input_extension(key)


def test_extension_is_case_insensitive_and_display_name_is_sanitised():
    assert input_extension("a/b/Photo.JPEG") == ".jpeg"
    assert display_name("uploads/../we\nird\x00.png") == "we?ird?.png"


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


def test_zip_images_in_archive_order_skipping_directories_and_clutter(tmp_path):
    data = make_zip(
        [
            ("digits/", b""),
            ("digits/b.png", png(SEVEN)),
            ("__MACOSX/digits/._b.png", b"\x00\x05junk"),
            ("digits/.DS_Store", b"junk"),
            ("digits/a.JPG", png(SEVEN, dark_on_light=True, fmt="JPEG")),
        ]
    )
    decoded = decode(write(tmp_path, "batch.zip", data))
    assert decoded.items == ["digits/b.png", "digits/a.JPG"]
    assert decoded.pixels.shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "entry", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "..\\evil.png", "C:/x.png"]
)
def test_zip_traversal_names_are_rejected(tmp_path, entry):
    data = make_zip([("ok.png", png(SEVEN)), (entry, png(SEVEN))])
    with pytest.raises(InputError, match="has an absolute or '..' path"):
        decode(write(tmp_path, "batch.zip", data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.zip"]  # nothing extracted


def test_zip_problems(tmp_path):
    with pytest.raises(InputError, match="entry 'notes.txt' is not a .png/.jpg/.jpeg image"):
        decode(write(tmp_path, "a.zip", make_zip([("notes.txt", b"hi")])))
    with pytest.raises(InputError, match="contains no .png/.jpg/.jpeg images"):
        decode(write(tmp_path, "b.zip", make_zip([("d/", b""), ("__MACOSX/x", b"")])))
    with pytest.raises(InputError, match=r"entry 'x.png' is not a readable PNG image"):
        decode(write(tmp_path, "c.zip", make_zip([("x.png", png(SEVEN)[:60])])))
    with pytest.raises(InputError, match="is not a readable zip archive"):
        decode(write(tmp_path, "d.zip", make_zip([("x.png", png(SEVEN))])[:40]))


def test_zip_limits(tmp_path, monkeypatch):
    data = make_zip([(f"{i}.png", png(SEVEN)) for i in range(3)])
    monkeypatch.setattr(inputs, "MAX_ZIP_ENTRIES", 2)
    with pytest.raises(InputError, match="has 3 entries, over the 2 limit"):
        decode(write(tmp_path, "a.zip", data))
    monkeypatch.setattr(inputs, "MAX_ZIP_ENTRIES", 10)
    monkeypatch.setattr(inputs, "MAX_ZIP_UNCOMPRESSED_BYTES", len(png(SEVEN)) * 2)
    with pytest.raises(InputError, match="uncompressed contents exceed"):
        decode(write(tmp_path, "b.zip", data))


# --- bundled samples and the spec ---------------------------------------------------------------------


def test_every_bundled_sample_decodes_to_its_labelled_item_count():
    labels = json.loads((SAMPLES / "labels.json").read_text())
    for name, truth in labels.items():
        assert len(decode(SAMPLES / name).items) == len(truth), name


VALID_SPEC = {
    "job_id": "j-0123456789abcdef",
    "input": {"bucket": "in-bucket", "key": "any key/../; rm -rf ~", "version_id": None},
    "output": {"bucket": "out-bucket", "prefix": "jobs/j-0123456789abcdef/"},
    "model_uri": "s3://art-bucket/models/digits-cnn.pt",
    "instance_id": "i-0abc",
}


def test_valid_spec_round_trips():
    spec = parse_spec(json.dumps(VALID_SPEC))
    assert spec.input_key == VALID_SPEC["input"]["key"]
    assert spec.output_key("manifest.json") == "jobs/j-0123456789abcdef/manifest.json"
    assert (spec.model_bucket, spec.model_key) == ("art-bucket", "models/digits-cnn.pt")
    # the optional fields come out with the values the job uses when they are absent
    defaults = {
        "lease": None, "max_concurrent_jobs": 4, "idle_shutdown_seconds": 600, "server_linger_seconds": 60,
        "max_runtime_seconds": None, "package": None, "params": {},
    }
    assert spec.to_json() == {**VALID_SPEC, **defaults}
    assert parse_spec(json.dumps(spec.to_json())) == spec


def test_optional_fields_round_trip():
    full = {
        **VALID_SPEC,
        "lease": {"table": "bw-jobs", "seconds": 90},
        "max_concurrent_jobs": 2,
        "idle_shutdown_seconds": 30.5,
        "server_linger_seconds": 0,
        "max_runtime_seconds": 3600,
        "package": {"name": "wordstats", "version": "ab" * 32, "uri": "s3://art-bucket/job-packages/w.tar.gz"},
        "params": {"top": 3, "mode": "fast", "ratio": 0.5, "strict": True},
    }
    spec = parse_spec(json.dumps(full))
    assert (spec.lease.table, spec.lease.seconds) == ("bw-jobs", 90.0)
    assert (spec.max_concurrent_jobs, spec.idle_shutdown_seconds) == (2, 30.5)
    assert spec.server_linger_seconds == 0 and spec.max_runtime_seconds == 3600.0
    assert spec.to_json() == full


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"job_id": "j-../../etc"}, "job_id must match"),
        ({"job_id": "j-0123456789ABCDEF"}, "job_id must match"),
        ({"input": {"bucket": "in-bucket", "key": ""}}, "input.key must be"),
        ({"input": {"bucket": "in-bucket", "key": "k" * 1025}}, "longer than 1024"),
        ({"input": {"bucket": "Bad_Bucket", "key": "k"}}, "input.bucket must be"),
        ({"output": {"bucket": "out-bucket"}}, "output.prefix must be"),
        ({"model_uri": "https://example.com/m.pt"}, "model_uri must look like"),
        ({"instance_id": "i-1; reboot"}, "instance_id must be"),
        ({"lease": {"table": "bw-jobs"}}, "lease must be null or"),
        ({"lease": {"table": "no/slash", "seconds": 90}}, "lease.table must be"),
        ({"lease": {"table": "bw-jobs", "seconds": 0}}, "lease.seconds must be"),
        ({"lease": {"table": "bw-jobs", "seconds": True}}, "lease.seconds must be"),
        ({"max_concurrent_jobs": 0}, "max_concurrent_jobs must be"),
        ({"max_concurrent_jobs": 2.5}, "max_concurrent_jobs must be"),
        ({"idle_shutdown_seconds": float("inf")}, "idle_shutdown_seconds must be"),
        ({"idle_shutdown_seconds": "600"}, "idle_shutdown_seconds must be"),
        ({"server_linger_seconds": -1}, "server_linger_seconds must be"),
        ({"server_linger_seconds": True}, "server_linger_seconds must be"),
        ({"server_linger_seconds": float("nan")}, "server_linger_seconds must be"),
        ({"max_runtime_seconds": 0}, "max_runtime_seconds must be"),
        ({"max_runtime_seconds": "60"}, "max_runtime_seconds must be"),
    ],
)
def test_invalid_spec_is_rejected(change, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(json.dumps({**VALID_SPEC, **change}))


def test_oversized_or_non_json_spec_is_rejected():
    with pytest.raises(SpecError, match="larger than 65536 bytes"):
        parse_spec(b" " * (64 * 1024 + 1))
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec(b"{nope")


def spec_with_id(n: int) -> dict:
    job = f"j-{n:016x}"
    return {**VALID_SPEC, "job_id": job, "output": {"bucket": "out-bucket", "prefix": f"jobs/{job}/"}}


def test_launch_request_is_one_spec_or_a_batch():
    specs, is_batch = parse_launch_request(json.dumps(VALID_SPEC).encode())
    assert not is_batch and [s.job_id for s in specs] == [VALID_SPEC["job_id"]]
    batch = {"jobs": [spec_with_id(n) for n in range(1, 4)]}
    specs, is_batch = parse_launch_request(json.dumps(batch).encode())
    assert is_batch and [s.job_id for s in specs] == [f"j-{n:016x}" for n in range(1, 4)]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"jobs": []}, "with 1 to 256 job specs"),
        ({"jobs": [VALID_SPEC] * 257}, "with 1 to 256 job specs"),
        ({"jobs": [VALID_SPEC], "extra": 1}, "a batch must be"),
        ({"jobs": VALID_SPEC}, "a batch must be"),
        (
            {"jobs": [spec_with_id(1), {**spec_with_id(2), "model_uri": "ftp://x"}]},
            r"jobs\[1\] \(job_id 'j-0000000000000002'\): model_uri must look like .*nothing was started",
        ),
        ({"jobs": [spec_with_id(1), spec_with_id(1)]}, r"jobs\[1\].*appears twice"),
        ({"jobs": ["j-0000000000000001"]}, r"jobs\[0\] \(job_id None\): job spec must be a JSON object"),
    ],
)
def test_invalid_batch_is_rejected_whole(request_, message):
    with pytest.raises(SpecError, match=message):
        parse_launch_request(json.dumps(request_).encode())


def test_launch_request_size_limits():
    padded = json.dumps({**VALID_SPEC, "pad": " " * 70_000}).encode()
    with pytest.raises(SpecError, match="larger than 65536 bytes; send a batch"):
        parse_launch_request(padded)
    with pytest.raises(SpecError, match="larger than 1048576 bytes"):
        parse_launch_request(b" " * (1024 * 1024 + 1))


def test_json_is_accepted_as_a_compute_workload():
    assert input_extension("load/long.JSON") == inputs.COMPUTE_EXTENSION
