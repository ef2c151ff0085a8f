"""Write the bundled demo inputs in samples/ from the held-out digits (deterministic; commit the output).

Every format the job reads, with true labels in samples/labels.json ({"file": [labels in item order]}):
PNGs light-on-dark and dark-on-light (the job inverts the latter), a blurred large PNG on grey paper,
an RGB JPEG, a CSV of raw 0-16 rows, a zip of 4 PNGs (plus __MACOSX clutter the job skips) and a .npy.
"""

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_model import load_split  # noqa: E402  (the same held-out split the model never saw)

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def render(raw: np.ndarray, size: int, *, dark_on_light: bool, paper: int = 255, ink: int = 0,
           resample: Image.Resampling = Image.Resampling.NEAREST, mode: str = "L") -> Image.Image:
    """An 8x8 digit on the 0-16 scale as a size x size image; ink/paper levels apply to dark_on_light."""
    level = raw.reshape(8, 8) / 16.0  # 0 background .. 1 full ink
    if dark_on_light:
        gray = paper + (ink - paper) * level
    else:
        gray = 255.0 * level
    img = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L")
    return img.resize((size, size), resample=resample).convert(mode)


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def first_index(labels: np.ndarray, digit: int) -> int:
    return int(np.flatnonzero(labels == digit)[0])


def main() -> int:
    _, x_test, _, y_test = load_split()
    SAMPLES_DIR.mkdir(exist_ok=True)
    truth: dict[str, list[int]] = {}

    singles = [
        ("digit-3.png", 3, dict(size=64, dark_on_light=False)),
        ("digit-7.png", 7, dict(size=64, dark_on_light=True)),
        ("digit-0.png", 0, dict(size=128, dark_on_light=True, paper=225, ink=40,
                                resample=Image.Resampling.BICUBIC)),
    ]
    for name, digit, options in singles:
        i = first_index(y_test, digit)
        (SAMPLES_DIR / name).write_bytes(png_bytes(render(x_test[i], **options)))
        truth[name] = [int(y_test[i])]

    i = first_index(y_test, 5)
    jpeg = render(x_test[i], 96, dark_on_light=True, paper=240, ink=20, resample=Image.Resampling.BILINEAR,
                  mode="RGB")
    jpeg.save(SAMPLES_DIR / "digit-5.jpg", format="JPEG", quality=90)
    truth["digit-5.jpg"] = [int(y_test[i])]

    rows = range(0, 5)
    np.savetxt(SAMPLES_DIR / "digits.csv", x_test[list(rows)], fmt="%d", delimiter=",")
    truth["digits.csv"] = [int(y_test[r]) for r in rows]

    zipped = range(5, 9)
    with zipfile.ZipFile(SAMPLES_DIR / "digits.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("digits/", date_time=ZIP_DATE), b"")
        for n, r in enumerate(zipped):
            img = render(x_test[r], 48, dark_on_light=n % 2 == 1)
            name = f"digits/{n + 1:02d}.png"
            archive.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), png_bytes(img), zipfile.ZIP_DEFLATED)
            if n == 0:
                junk = zipfile.ZipInfo(f"__MACOSX/digits/._{n + 1:02d}.png", date_time=ZIP_DATE)
                archive.writestr(junk, b"\x00\x05\x16\x07 macOS resource fork")
    truth["digits.zip"] = [int(y_test[r]) for r in zipped]

    arrays = range(9, 15)
    np.save(SAMPLES_DIR / "digits.npy", x_test[list(arrays)].reshape(-1, 8, 8).astype(np.float32))
    truth["digits.npy"] = [int(y_test[r]) for r in arrays]

    (SAMPLES_DIR / "labels.json").write_text(json.dumps(truth, indent=2) + "\n")
    for name, labels in truth.items():
        print(f"{name}: {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
