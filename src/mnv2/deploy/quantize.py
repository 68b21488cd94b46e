"""Int8 static post-training quantisation with onnxruntime.quantization, and its top-1 agreement with fp32.

QDQ format with per-channel int8 weights and uint8 activations (the U8S8 pairing onnxruntime's x86 kernels are built
for), calibrated on the user's images through the model's own eval preprocessing. Dynamic quantisation is not offered
(static QDQ is what the int8 rows of BENCHMARKS.md "Inference", benchmarks/inference.py, measure; dynamic is not
benchmarked). A detector is measured by COCO AP (`detection_ap`), a segmentation model by mIoU (`segmentation_miou`),
fp32 beside int8 on a val split.
"""

from __future__ import annotations

import contextlib
import io
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from ..choices import CALIBRATION_METHODS, DEFAULT_METHOD
from ..errors import UserError
from ..progress import progress_bar
from .export import INPUT_NAME, META_INT8, optional_import
from .export_detection import DETECTION_OUTPUTS, RAW_OUTPUTS, graph_outputs, join_detection_parts, split_detection_graph
from .preprocess import Preprocess, dumps


class CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol (`get_next`) over preprocessed single-image batches.

    Images are preprocessed lazily, one at a time, so calibrating on many images does not hold them all in memory.
    """

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches: Iterator[np.ndarray] = iter(batches)

    @classmethod
    def from_images(cls, images: list, preprocess: Preprocess) -> CalibrationReader:
        return cls(preprocess([im]).numpy() for im in images)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


class PerImageCalibrationReader:
    """A calibration reader that onnxruntime runs one image per statistics pass: `__len__` and `set_range` let
    `quantize_static` collect, fold into its histograms and drop each image's activations in turn (its
    `CalibStridedMinMax` option, stride 1, which every calibration method honours).

    For segmentation graphs, whose height and width are free: images calibrate at their own sizes -- the sizes the
    graph runs at -- which a single pass cannot do, as the histogram calibrators (percentile, entropy) stack all the
    activations they collect in one pass into one array; and memory holds one image's activations, not all of them
    (a DeepLabv3 at VOC sizes has ~100 MB of activations per image)."""

    def __init__(self, images: list, preprocess: Preprocess):
        self.images, self.preprocess = list(images), preprocess
        self._indices: Iterator[int] = iter(range(len(self.images)))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._indices = iter(range(start_index, min(end_index, len(self.images))))

    def get_next(self) -> dict | None:
        i = next(self._indices, None)
        return None if i is None else {INPUT_NAME: self.preprocess([self.images[i]]).numpy()}


def split_calibration(images: list, calib_images: int, seed: int = 0,
                      heldout_images: int | None = None) -> tuple[list, list]:
    """(calibration, held-out): a seeded shuffle; at most half of the images calibrate, the rest are held out, at most
    `heldout_images` of them (None: all), so a large folder does not make the agreement check run for hours."""
    if len(images) < 2:
        raise UserError(f"need at least 2 images to calibrate and check int8 agreement, found {len(images)}")
    if calib_images < 1:
        raise UserError(f"--calib-images must be at least 1, got {calib_images}")
    shuffled = list(images)
    random.Random(seed).shuffle(shuffled)
    n = min(calib_images, len(shuffled) // 2)
    return shuffled[:n], shuffled[n:][:heldout_images]


def quantize_int8(fp32_model: bytes | str | Path, out: str | Path,
                  reader: CalibrationReader | PerImageCalibrationReader,
                  method: str = DEFAULT_METHOD, info: dict | None = None) -> Path:
    """Write the int8 QDQ version of an fp32 ONNX model to `out` (atomically); metadata_props are kept and `info`
    (e.g. calibration count, agreement) is stored under "mnv2.int8". Of a detection graph (mnv2.deploy.export_detection)
    only the network is quantised, calibrated on the normalised batches `reader` gives: the pixel input's
    normalisation, decoding and NMS stay fp32."""
    onnx = optional_import("onnx", "export", "int8 quantisation")
    q = optional_import("onnxruntime.quantization", "export", "int8 quantisation")
    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {method!r}; expected one of {', '.join(CALIBRATION_METHODS)}")
    calibrate = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                 "percentile": q.CalibrationMethod.Percentile}[method]
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="mnv2-int8-") as work:
        src = Path(work) / "fp32.onnx"
        if isinstance(fp32_model, (bytes, bytearray)):
            src.write_bytes(fp32_model)
        else:
            src.write_bytes(Path(fp32_model).read_bytes())
        original = onnx.load(str(src))
        parts = None
        if graph_outputs(original) in (DETECTION_OUTPUTS, RAW_OUTPUTS):
            parts = split_detection_graph(original)
            onnx.save(parts.network, str(src))
        pre = Path(work) / "pre.onnx"
        # Shape inference + graph optimisation first, so every tensor has a known shape and Conv+Clip pairs are
        # fused before QDQ nodes are placed (onnxruntime's recommended preparation). With free height and width
        # (segmentation) the symbolic inference cannot prove two branches' sizes equal (e.g. at the concat of the
        # image-pooling and 1x1 branches) and gives up; auto_merge lets it merge such dims.
        q.quant_pre_process(str(src), str(pre), auto_merge=_free_size(original))
        quantized = Path(work) / "int8.onnx"
        # Resize stays fp32: quantised, the full-size upsampling of a segmentation graph that ends in one (ours
        # end at the output stride now; older exports and other models do not) ran slower than the whole int8
        # network before it (15.7 vs 8.9 ms at 512, mnv2.bench.segmentation), for no accuracy to gain.
        keep_fp32 = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Resize"]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress to stdout
                q.quantize_static(str(pre), str(quantized), reader, quant_format=q.QuantFormat.QDQ,
                                  per_channel=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8, calibrate_method=calibrate,
                                  nodes_to_exclude=keep_fp32,
                                  extra_options={"CalibStridedMinMax": 1} if hasattr(reader, "set_range") else {})
        except (ValueError, RuntimeError) as e:  # e.g. percentile histograms of near-constant activations
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"int8 calibration ({method}) failed: {first}; try another --calib-method") from None
        model = onnx.load(str(quantized))
        if parts is not None:
            model = join_detection_parts(parts._replace(network=model))
        del model.metadata_props[:]
        for entry in original.metadata_props:
            model.metadata_props.add(key=entry.key, value=entry.value)
        model.metadata_props.add(key=META_INT8, value=dumps({"method": method, **(info or {})}))
        data = model.SerializeToString()
    return _atomic_write(out, data)


def _free_size(proto) -> bool:
    """Whether the image input's height or width is dynamic."""
    initializers = {t.name for t in proto.graph.initializer}
    image = next(i for i in proto.graph.input if i.name not in initializers)
    return any(not d.HasField("dim_value") for d in image.type.tensor_type.shape.dim[2:])


def set_int8_info(path: str | Path, info: dict) -> None:
    """Replace the "mnv2.int8" metadata of an int8 .onnx file (e.g. to record its measured agreement), atomically."""
    onnx = optional_import("onnx", "export", "int8 quantisation")
    model = onnx.load(str(path))
    kept = [(e.key, e.value) for e in model.metadata_props if e.key != META_INT8]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    model.metadata_props.add(key=META_INT8, value=dumps(info))
    _atomic_write(Path(path), model.SerializeToString())


@dataclass
class Agreement:
    """Top-1 agreement of the int8 model with the fp32 model on images neither was calibrated on."""

    matches: int
    images: int

    @property
    def fraction(self) -> float:
        return self.matches / self.images if self.images else float("nan")


@torch.inference_mode()
def top1_agreement(fp32_run, int8_run, images: list, preprocess: Preprocess, batch_size: int = 16,
                   progress: bool = False, desc: str = "top-1 agreement") -> Agreement:
    """`fp32_run` / `int8_run`: callables from a float batch (numpy) to logits."""
    matches = 0
    bar = progress_bar(total=len(images), desc=desc, enabled=progress)
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size]).numpy()
        matches += int((np.argmax(fp32_run(x), 1) == np.argmax(int8_run(x), 1)).sum())
        bar.update(len(x))
    bar.close()
    return Agreement(matches, len(images))


def _atomic_write(out: Path, data: bytes) -> Path:
    if not out.parent.is_dir():
        raise UserError(f"{out}: output directory {out.parent} does not exist")
    return atomic_write_bytes(out, data)


def detection_ap(predictors: dict, val_dir: str | Path, batch_size: int = 8) -> tuple[dict[str, dict], int]:
    """({name: COCO metrics}, images) of each DetectionPredictor on the val split of the COCO-layout folder
    `val_dir` (data.coco.find_coco_split: COCO 2017's or the shapes layout), scored by COCOeval as `mnv2 eval` does:
    the detectors' own score threshold, their labels mapped back to the file's category ids."""
    from torchvision.transforms.v2.functional import to_pil_image

    from ..data.coco import CocoDetection, find_coco_split
    from ..eval.coco import coco_evaluate, to_coco_results

    first = next(iter(predictors.values()))
    dataset = CocoDetection(*find_coco_split(val_dir, "val"), category_ids=list(first.spec.category_ids))
    found = {name: {} for name in predictors}
    for i in range(0, len(dataset), batch_size):
        ids = dataset.image_ids[i:i + batch_size]
        images = [to_pil_image(dataset[j][0]) for j in range(i, i + len(ids))]  # the eval loader's pixels
        for name, predictor in predictors.items():
            for image_id, dets in zip(ids, predictor.predict_images(images)):
                found[name][image_id] = {"boxes": torch.tensor([d.box for d in dets]).reshape(-1, 4),
                                         "scores": torch.tensor([d.score for d in dets]),
                                         "labels": torch.tensor([d.label for d in dets], dtype=torch.long)}
    metrics = {name: coco_evaluate(dataset.coco, to_coco_results(dets, dataset.category_ids), dataset.image_ids)[0]
               for name, dets in found.items()}
    return metrics, len(dataset)


def segmentation_val_data(val_dir: str | Path):
    """The val split of the segmentation data under `val_dir`, found as `mnv2 eval` finds it (VOC's layout or the
    shapes set's), as a SegmentationDataset of uint8 images and masks at full resolution; a UserError if absent."""
    from ..data.voc import SegmentationDataset
    from ..engine.config import Config
    from ..engine.tasks.segmentation import SegmentationTask

    task = SegmentationTask(Config(task="segmentation"), Path(val_dir))
    return SegmentationDataset(task.samples("val"), task.find_class_names())


def segmentation_miou(predictors: dict, dataset) -> dict[str, dict]:
    """{name: segmentation_metrics (mIoU, pixel_acc, per_class, pixels)} of each SegmentationPredictor on `dataset`
    (`segmentation_val_data`), scored as `mnv2 eval` scores: one confusion matrix over every image at its full
    resolution, label 255 ignored. Each predictor preprocesses the image itself, so a fixed-size one is measured
    with its stretch and resize back."""
    from torchvision.transforms.v2.functional import to_pil_image

    from ..eval.segmentation import confusion_matrix, segmentation_metrics

    first = next(iter(predictors.values()))
    n = len(first.class_names)
    if n != dataset.num_classes:
        raise UserError(f"the model predicts {n} classes but the val data has {dataset.num_classes} "
                        f"({', '.join(dataset.class_names[:4])}, ...)")
    confusion = {name: torch.zeros(n, n, dtype=torch.int64) for name in predictors}
    for i in range(len(dataset)):
        image, mask = dataset[i]
        pil = to_pil_image(image)  # the uint8 pixels the eval preset normalises
        for name, predictor in predictors.items():
            pred = torch.from_numpy(predictor.predict_images([pil])[0])
            confusion[name] += confusion_matrix(pred, mask.as_subclass(torch.Tensor), n)
    return {name: segmentation_metrics(cm, first.class_names) for name, cm in confusion.items()}
