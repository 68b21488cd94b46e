"""`SegmentationPredictor`: images in, one class-index mask per image at its own size out; masks saved as VOC-palette
PNGs or drawn over their image.

The shared `Predictor` (load -> preprocess -> run on any backend -> postprocess) with a segmentation model's steps.
By default the network runs at each image's own size on its normalised pixels -- the evaluation `mnv2 eval` scores
(one confusion matrix at each image's full resolution) -- so what `predict` shows is what `eval` measures. With
`resolution=R` every image is stretched to R x R, the fixed input of an accelerator (the on-device 512 x 512 case,
and what a `mnv2 export --resolution R` graph takes). Either way the backends stop at the class logits at the output
stride, and `class_map` upsamples them bilinearly to the image's own size and takes the argmax in one fused pass,
as the model's `forward` upsamples them to its input's.

Images of one input size share a batch; others run alone. Padding them to one size would change the result: the
image-pooling branch averages the whole input, padding included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .export import META_CLASSES, META_PREPROCESS, META_TASK, SEGMENTATION
from .export_segmentation import (
    LogitsAtStride,
    segmentation_class_names,
    segmentation_onnx,
    segmentation_preprocess,
)
from .preprocess import Preprocess, load_image
from .runtime import Predictor, build_backend, inspect_onnx, onnx_backend_name, onnx_runner

MAX_CLASSES = 256  # a uint8 mask, a PNG palette


class ClassShare(NamedTuple):
    label: int
    name: str
    fraction: float  # of the image's pixels


class SegmentationPredictor(Predictor):
    """>>> p = SegmentationPredictor.from_run("runs/voc", backend="onnxruntime")
    >>> mask = p.predict(["street.jpg"])[0]      # uint8 [H, W] class indices, the image's own size
    >>> save_mask(mask, "street.png"); overlay("street.jpg", mask, "street_overlay.jpg")"""

    def __init__(self, backend, backend_name: str, preprocess: Preprocess, class_names: Sequence[str],
                 batch_size: int = 8, fixed_batch: int | None = None):
        if preprocess.resize not in ("none", "stretch"):
            raise UserError(f"a segmentation model's preprocessing resizes 'none' or 'stretch', not "
                            f"{preprocess.resize!r}")
        if len(class_names) > MAX_CLASSES:
            raise UserError(f"{len(class_names)} classes do not fit a uint8 mask (at most {MAX_CLASSES})")
        super().__init__(backend, backend_name, preprocess, class_names, batch_size, fixed_batch)

    @property
    def resolution(self) -> int | None:
        """The fixed square input size, or None: each image at its own size."""
        return self.preprocess.resolution if self.preprocess.resize == "stretch" else None

    # construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, config: dict, backend: str | None = None, threads: int | None = None,
                   batch_size: int = 8, resolution: int | None = None, calib_images: list | None = None,
                   graph: Callable[[], bytes] | None = None) -> SegmentationPredictor:
        """A predictor for a segmentation model and its config (as stored with its weights); default backend
        torch-fast, which needs no export (the ONNX backends export the model in memory first, ~10 s for a
        DeepLabv3 here). `resolution`: run every image at R x R; `calib_images`: the int8 backends' calibration."""
        if config.get("task") not in (SEGMENTATION, None):
            raise UserError(f"a {config['task']} model, not a segmentation model")
        with torch.inference_mode():
            out = model.eval()(torch.zeros(1, 3, 32, 32))
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise UserError(f"{config.get('model')}: not a segmentation model (its output is not per-pixel logits "
                            "[N, C, H, W])")
        name = backend or "torch-fast"
        preprocess = segmentation_preprocess(config.get("preprocess"), resolution)
        names = segmentation_class_names(config.get("class_names"), int(out.shape[1]))
        calibration = None
        if calib_images:
            from .quantize import PerImageCalibrationReader
            calibration = lambda: PerImageCalibrationReader(calib_images, preprocess)
        graph = graph or (lambda: segmentation_onnx(model, config, preprocess).SerializeToString())
        runner = build_backend(name, LogitsAtStride(model), preprocess.resolution, threads, calibration, graph)
        return cls(runner, name, preprocess, names, batch_size)

    @classmethod
    def from_onnx(cls, path: str | Path, backend: str | None = None, threads: int | None = None,
                  batch_size: int = 8, resolution: int | None = None) -> SegmentationPredictor:
        """A predictor for a segmentation .onnx file written by `mnv2 export` (fp32 or int8); preprocessing and
        class names come from its metadata_props. A graph with free height and width runs each image at its own
        size, or at `resolution`; a fixed-size graph at its size."""
        proto, meta, (batch, height, width), num_classes = inspect_onnx(path)
        task = meta.get(META_TASK)
        if task != SEGMENTATION:
            runner = ("DetectionPredictor" if task == "detection" else "Predictor") + ".from_onnx"
            raise UserError(f"{path}: not a segmentation model (a {task or 'classifier'}: {runner} runs it)")
        try:
            preprocess = segmentation_preprocess(meta.get(META_PREPROCESS), resolution, str(path))
            names = segmentation_class_names(meta.get(META_CLASSES), num_classes, str(path))
        except UserError as e:  # name the file once
            message = str(e)
            raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        fixed = isinstance(height, int) or isinstance(width, int)  # a `--resolution` export
        if fixed and (preprocess.resize != "stretch" or (height, width) != (preprocess.resolution,) * 2):
            wanted = (f"{preprocess.resolution}x{preprocess.resolution}" if preprocess.resize == "stretch"
                      else "each image's own size")
            raise UserError(f"{path}: the graph takes {height}x{width} images only, not {wanted}")
        name = onnx_backend_name(path, meta, backend)
        return cls(onnx_runner(path, proto, name, threads), name, preprocess, names, batch_size, fixed_batch=batch)

    # the steps ---------------------------------------------------------------------------------------------------
    def postprocess(self, logits: np.ndarray, image_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Class logits [N, C, h, w] -- at the output stride (what the backends here and an exported graph give) or
        at any other size (an older export's, upsampled) -> uint8 class-index masks [H, W] at each image's size:
        resized bilinearly (align_corners=False, as the model upsamples its own) and argmax'd, fused (`class_map`)."""
        with self.beside_runtime():  # after onnxruntime's threads, 2 torch threads took 16 ms instead of ~1 here
            return [class_map(torch.from_numpy(np.ascontiguousarray(logits[i:i + 1])), size)[0].numpy()
                    for i, size in enumerate(image_sizes)]

    def predict_images(self, images: Sequence) -> list[np.ndarray]:
        """Masks for PIL images (already loaded), in order."""
        images = [load_image(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):  # one batch per input size
            size = (im.height, im.width) if self.resolution is None else (self.resolution, self.resolution)
            groups.setdefault(size, []).append(i)
        masks: list[np.ndarray | None] = [None] * len(images)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                logits = self.run(self.load([images[i] for i in chunk]))
                for i, mask in zip(chunk, self.postprocess(logits, [(images[i].height, images[i].width)
                                                                    for i in chunk])):
                    masks[i] = mask
        return masks

    def predict(self, images: Sequence) -> list[np.ndarray]:
        """Masks for image files or PIL images: uint8 [H, W] class indices (`class_names[i]`) at each image's size.
        Every file is read before the first forward pass."""
        return self.predict_images([load_image(im) for im in images])

    def class_shares(self, mask: np.ndarray) -> list[ClassShare]:
        """The classes present in `mask` with the fraction of its pixels each covers, largest first."""
        counts = np.bincount(np.asarray(mask).ravel(), minlength=len(self.class_names))
        order = np.argsort(-counts, kind="stable")
        return [ClassShare(int(c), self.class_names[c], float(counts[c] / mask.size)) for c in order if counts[c]]


# --- the class map ---------------------------------------------------------------------------------------------------

def class_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, H, W]: the first class of largest logit at each pixel of `logits` [N, C, h, w] resized bilinearly to
    `size` (F.interpolate, align_corners=False): the model's `forward` and an argmax, i.e. its class map.

    Native (csrc/upsample_argmax.cpp) where the kernels build: one pass, row by row, no C x H x W tensor -- at
    21 x 32 x 32 -> 512 x 512, one thread, 1.4 ms against 15 ms for F.interpolate + max here (a loaded host); equal
    to it, tested. Otherwise F.interpolate and max(1).indices (the first largest, as argmax, in ~0.4x argmax's time
    over the strided class axis)."""
    from .. import native

    height, width = size
    if logits.device.type == "cpu" and logits.shape[1] <= MAX_CLASSES and native.available():
        return torch.ops.mnv2_native.upsample_argmax(logits, height, width)
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
    return logits.max(1).indices.to(torch.uint8)


# --- writing masks -------------------------------------------------------------------------------------------------

def _palette() -> list[int]:
    from ..data.synthetic import voc_colormap
    return voc_colormap().ravel().tolist()


def _as_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype.kind not in "ui" or (mask.size and (mask.min() < 0 or mask.max() >= MAX_CLASSES)):
        raise UserError(f"a mask is a 2-D array of class indices 0..{MAX_CLASSES - 1}, got {mask.dtype} "
                        f"{tuple(mask.shape)}")
    return np.ascontiguousarray(mask, dtype=np.uint8)


def save_mask(mask, path: str | Path) -> Path:
    """`mask` as a palette PNG, written atomically: pixel values are the class indices and the colours PASCAL VOC's
    palette -- the format of VOC's SegmentationClass files, which data.voc (and so `mnv2 eval`) reads as masks."""
    from ..atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: masks are written as .png (palette images keep the class indices)")
    image = Image.fromarray(_as_mask(mask))  # mode L, the indices as values
    image.putpalette(_palette())  # L -> P, values unchanged
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def overlay(image, mask, path: str | Path, alpha: float = 0.5) -> Path:
    """The image with each non-background pixel (class > 0; class 0 is background, as in VOC and labels.txt)
    blended with its class's VOC colour (`alpha` of the colour), written atomically as .jpg or .png."""
    from ..atomic import atomic_path
    from ..data.synthetic import voc_colormap

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: overlays are written as .jpg or .png")
    if not 0 <= alpha <= 1:
        raise UserError(f"overlay alpha must be in [0, 1], got {alpha}")
    mask = _as_mask(mask)
    pixels = np.asarray(load_image(image), dtype=np.float32)
    if pixels.shape[:2] != mask.shape:
        raise UserError(f"{path}: the mask is {mask.shape[1]}x{mask.shape[0]} but the image "
                        f"{pixels.shape[1]}x{pixels.shape[0]}")
    colours = voc_colormap()[mask].astype(np.float32)
    blended = np.where((mask > 0)[..., None], (1 - alpha) * pixels + alpha * colours, pixels)
    with atomic_path(path) as tmp:
        Image.fromarray(np.round(blended).astype(np.uint8)).save(tmp, format=fmt)
    return path
