"""Decode and transform speed for classification inputs: PIL vs torchvision.io JPEG decoding, PIL draft() scaling,
and the v2 presets on PIL images vs uint8 tensors. Prints a table of medians (microseconds per image, 1 thread).

    python benchmarks/data_decode.py [--repeats 7]

The images are the embedded shapes dataset's kind (textured background + shapes) written at several sizes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from mnv2.data.images import load_image
from mnv2.data.shapes import classification_scene
from mnv2.data.transforms import eval_preset, train_preset

SIZES = (64, 128, 256, 500)


def median_us(fn, n: int, repeats: int) -> tuple[float, float]:
    for _ in range(max(3, n // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs), max(runs) - min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torchvision.io as tio  # deprecated decoders in torchvision >= 0.29: measured for comparison only
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities.*")

    with tempfile.TemporaryDirectory() as tmp:
        print("us/image, median ± spread; train/eval at 96 px for inputs <= 128 px, else 224 px")
        print(f"{'px':>4} {'PIL':>14} {'torchvision.io':>14} {'PIL draft->96':>14} "
              f"{'train PIL':>14} {'train tensor':>14} {'eval PIL':>14} {'eval tensor':>14}")
        for size in SIZES:
            scene = classification_scene(np.random.default_rng(size), size, label=size % 8)
            path = Path(tmp) / f"{size}.jpg"
            Image.fromarray(scene.image).save(path, quality=90)
            n = 300 if size <= 128 else 60
            cells = measure_row(path, 96 if size <= 128 else 224, n, args.repeats, tio)
            print(f"{size:>4} " + " ".join(f"{m:>8.0f} ±{s:>4.0f}" for m, s in cells))


def measure_row(path: Path, res: int, n: int, repeats: int, tio) -> list[tuple[float, float]]:
    """One table row: decoding `path` three ways, then the train and eval presets at `res` on PIL and tensor."""
    pil_image = load_image(path)
    tensor = F.pil_to_tensor(pil_image)
    train, evaluate = train_preset(res), eval_preset(res)
    return [
        median_us(lambda: F.pil_to_tensor(load_image(path)), n, repeats),
        median_us(lambda: tio.decode_jpeg(tio.read_file(str(path)), mode=tio.ImageReadMode.RGB), n, repeats),
        median_us(lambda: F.pil_to_tensor(load_image(path, min_size=96)), n, repeats),
        median_us(lambda: train(pil_image), n, repeats),
        median_us(lambda: train(tensor), n, repeats),
        median_us(lambda: evaluate(pil_image), n, repeats),
        median_us(lambda: evaluate(tensor), n, repeats),
    ]


if __name__ == "__main__":
    main()
