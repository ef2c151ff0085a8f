"""Edge maps with torch: each image item gives outputs/<name>.edges.png (or .npy) and a row of statistics."""

import io
from pathlib import PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAX_PIXELS = 50_000_000  # bigger images are refused, per item


class EdgeMaps:
    def setup(self, ctx):
        self.device = torch.device(ctx.device)
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1).to(self.device)  # 2 x 1 x 3 x 3
        ctx.log.info(f"edge detector ready on {self.device}")

    def process(self, items, ctx):
        for item in items:
            with ctx.item(item):
                with Image.open(item.path) as image:
                    if image.width * image.height > MAX_PIXELS:
                        raise ValueError(f"{image.width}x{image.height} pixels is over the {MAX_PIXELS:,} limit")
                    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
                edges = self.edges(gray, ctx.params["threshold"])
                stem = PurePosixPath(item.name).stem
                if ctx.params["format"] == "npy":
                    buffer = io.BytesIO()
                    np.save(buffer, edges, allow_pickle=False)
                    name = f"{stem}.edges.npy"
                    ctx.write_output(name, buffer.getvalue())
                else:
                    buffer = io.BytesIO()
                    Image.fromarray((edges * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
                    name = f"{stem}.edges.png"
                    ctx.write_output(name, buffer.getvalue())
                yield item, {"width": gray.shape[1], "height": gray.shape[0],
                             "mean_edge": round(float(edges.mean()), 6), "output": f"outputs/{name}"}

    def edges(self, gray: np.ndarray, threshold: float) -> np.ndarray:
        """Sobel gradient magnitude, scaled to 0-1, values under threshold set to 0."""
        with torch.inference_mode():
            pixels = torch.from_numpy(gray).to(self.device)[None, None]
            gradients = F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), self.kernels)
            magnitude = gradients.pow(2).sum(dim=1).sqrt()[0]
            magnitude = magnitude / magnitude.max().clamp(min=1e-6)
            magnitude[magnitude < threshold] = 0.0
            return magnitude.cpu().numpy().astype(np.float32)
