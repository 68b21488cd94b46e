"""A detector as one ONNX file: the image's pixels in, the network, then decode + per-class NMS + the best K
detections in the graph.

The input "image" is uint8 [N, R, R, 3]: RGB pixels already resized to the detector's square input
(`Preprocess.pixels`, the eval preset's resize), as TF Lite's SSD detectors take them. The graph normalises them
itself (`pixels_onnx`: the eval preset's mean and std), which costs the runtimes next to nothing where the same
work in PyTorch before the call took ~0.4 ms of a ~7 ms int8 detection, and hands them a quarter of the bytes.
Then two dynamo exports joined at the heads: the BN-folded network ("input" [N, 3, R, R] float ->
"cls_logits" [N, A, C + 1], "box_deltas" [N, A, 4]) and `mnv2.detection.select_detections` itself, the function
eval and predict use, whose NMS custom op becomes ONNX NonMaxSuppression (one batch per image and class, so the
per-class NMS is exact). Outputs, per image, fixed-shape so every runtime can batch them (K = max_detections):

  boxes  [N, K, 4] float  xyxy normalised to the input, clipped to [0, 1]: times (W, H, W, H) of ANY original
                          image it was resized from gives that image's pixels (the input is a stretched resize)
  scores [N, K] float     best first; zero from `count` on
  labels [N, K] int64     1..C (category_ids[label - 1] is the dataset's id); zero (background) from `count` on
  count  [N] int64        detections of each image

The normalised input and the heads keep their names inside the graph, so int8 quantises the network part alone and
normalisation and NMS stay fp32 (`split_detection_graph`). With raw=True the network's two heads are the outputs.
Before the file is written, onnxruntime runs each part and the whole on PyTorch's inputs and must agree with PyTorch.
Graphs written before the pixel input (input "input", the normalised float batch) still load and run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..detection import KINDS, BoxCoder, select_detections, ssd_anchors
from ..errors import UserError
from .export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    META_CATEGORY_IDS,
    META_CLASSES,
    META_MODEL,
    META_POSTPROCESS,
    META_PREPROCESS,
    META_TASK,
    check_target,
    max_difference,
    optional_import,
    set_metadata,
    to_onnx,
)
from .preprocess import Preprocess, dumps

PIXELS_NAME = "image"  # the graph's input: uint8 [N, R, R, 3]
RAW_OUTPUTS = ("cls_logits", "box_deltas")
DETECTION_OUTPUTS = ("boxes", "scores", "labels", "count")
_POST_PREFIX = "post/"


@dataclass(frozen=True)
class DetectorSpec:
    """What turns a detector's heads into named detections: its preprocessing, classes and post-processing
    settings, from the config stored with its weights (engine.tasks.detection) or an .onnx file's metadata."""

    preprocess: Preprocess
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    kind: str = "sigmoid"
    score_threshold: float = 1e-8
    iou_threshold: float = 0.6
    max_detections: int = 100
    anchor_layout: str = "tf"

    @classmethod
    def from_config(cls, config: dict, num_classes: int, source: str = "detector weights") -> DetectorSpec:
        pre, post = config.get("preprocess") or {}, config.get("postprocess") or {}
        if "resolution" not in pre:
            raise UserError(f"{source}: no input resolution in the 'preprocess' settings")
        names = list(config.get("class_names") or [f"class_{i}" for i in range(1, num_classes + 1)])
        ids = [int(i) for i in config.get("category_ids") or range(1, num_classes + 1)]
        if len(names) != num_classes or len(ids) != num_classes:
            raise UserError(f"{source}: the model predicts {num_classes} classes but has {len(names)} class names "
                            f"and {len(ids)} category ids")
        spec = cls(Preprocess.from_dict({"resize": "stretch", **pre}), tuple(names), tuple(ids),
                   post.get("kind", "sigmoid"), float(post.get("score_threshold", 1e-8)),
                   float(post.get("iou_threshold", 0.6)), int(post.get("max_detections", 100)),
                   post.get("anchor_layout", "tf"))
        if spec.kind not in KINDS:
            raise UserError(f"{source}: postprocess kind {spec.kind!r} is not one of {', '.join(KINDS)}")
        if not (0 <= spec.score_threshold < 1 and 0 < spec.iou_threshold <= 1 and spec.max_detections >= 1):
            raise UserError(f"{source}: postprocess settings out of range (score_threshold in [0, 1), "
                            f"iou_threshold in (0, 1], max_detections >= 1): {post}")
        return spec

    @classmethod
    def from_metadata(cls, meta: dict, num_classes: int, source: str) -> DetectorSpec:
        return cls.from_config({"preprocess": meta.get(META_PREPROCESS), "postprocess": meta.get(META_POSTPROCESS),
                                "class_names": meta.get(META_CLASSES), "category_ids": meta.get(META_CATEGORY_IDS)},
                               num_classes, source)

    @property
    def resolution(self) -> int:
        return self.preprocess.resolution

    def anchors(self) -> torch.Tensor:
        return ssd_anchors(self.resolution, layout=self.anchor_layout)

    def select(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor | None = None):
        """`select_detections` with these settings: (boxes, scores, labels, count), the graph's four outputs."""
        return select_detections(cls_logits, box_deltas, self.anchors() if anchors is None else anchors, self.kind,
                                 self.score_threshold, self.iou_threshold, self.max_detections)

    def metadata(self, config: dict, outputs: tuple[str, ...]) -> dict[str, str]:
        post = {"kind": self.kind, "score_threshold": self.score_threshold, "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections, "anchor_layout": self.anchor_layout,
                "in_graph": outputs == DETECTION_OUTPUTS}
        return {META_TASK: dumps("detection"),
                META_MODEL: dumps({"model": config.get("model"), "model_kwargs": config.get("model_kwargs", {})}),
                META_PREPROCESS: dumps(self.preprocess.to_dict()), META_POSTPROCESS: dumps(post),
                META_CLASSES: dumps(list(self.class_names)), META_CATEGORY_IDS: dumps(list(self.category_ids))}


class _Detections(nn.Module):
    """`select_detections` with a detector's settings as a module, for the exporter; the anchors are a constant."""

    def __init__(self, spec: DetectorSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("anchors", spec.anchors())

    def forward(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor):
        return self.spec.select(cls_logits, box_deltas, self.anchors)


def _nms_rows_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    """mnv2::nms_rows in ONNX: NonMaxSuppression with each row a batch of one class, its [M, 3] selection (row, 0,
    box) scattered into a keep mask. NMS's IoU test (suppress above the threshold) and box-corner handling are
    torchvision's; its score test is repeated outside the op, so >= vs > at the threshold cannot differ."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, [1]), op.Squeeze(op.Shape(scores, start=1, end=2)),
                                    op.Constant(value_float=iou_threshold), op.Constant(value_float=score_threshold))
    rows_and_boxes = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(selected, start=0, end=1))
    keep = op.ScatterND(op.ConstantOfShape(op.Shape(scores)), rows_and_boxes, ones)
    return op.Cast(keep, to=ir.DataType.BOOL)


def _postprocess_onnx(spec: DetectorSpec, num_anchors: int, dynamic_batch: bool, opset: int):
    """The post-processing graph alone: inputs "cls_logits", "box_deltas" -> the four DETECTION_OUTPUTS."""
    n = 2 if dynamic_batch else 1
    example = (torch.zeros(n, num_anchors, len(spec.class_names) + 1), torch.zeros(n, num_anchors, 4))
    batch = torch.export.Dim("batch", min=1)
    shapes = {"cls_logits": {0: batch}, "box_deltas": {0: batch}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Detections(spec), example, dynamo=True, opset_version=opset,
                                    input_names=list(RAW_OUTPUTS), output_names=list(DETECTION_OUTPUTS),
                                    dynamic_shapes=shapes, verbose=False,
                                    custom_translation_table={torch.ops.mnv2.nms_rows.default: _nms_rows_onnx})
    return program.model_proto


def pixels_onnx(preprocess: Preprocess, dynamic_batch: bool, like):
    """The graph's first part: "image" uint8 [N, R, R, 3] -> "input" float [N, 3, R, R], normalised as the eval
    preset normalises (to float32 rounding): Transpose, Cast, and one BatchNormalization whose statistics are the
    preset's mean and std in pixel units -- an exact per-channel (x - mean) / std. As Sub + Mul (or Mul + Add), it
    cost onnxruntime's int8 SSDLite graph 1.2-1.4 ms more per call than the float input (its broadcasting kernels;
    BatchNormalization: 0.1-0.4 ms); OpenVINO ran either within ~0.2 ms of the float input (2 threads). IR version
    and opsets are those of `like`, to join it."""
    onnx = optional_import("onnx", "export", "ONNX export")
    from onnx import TensorProto, helper, numpy_helper

    r, batch = preprocess.resolution, "batch" if dynamic_batch else 1
    mean = np.asarray(preprocess.mean, np.float32) * 255
    var = (np.asarray(preprocess.std, np.float32) * 255) ** 2
    constants = {"pixels/scale": np.ones(3, np.float32), "pixels/bias": np.zeros(3, np.float32),
                 "pixels/mean": mean, "pixels/var": var}
    nodes = [helper.make_node("Transpose", [PIXELS_NAME], ["pixels/nchw"], "pixels/transpose", perm=[0, 3, 1, 2]),
             helper.make_node("Cast", ["pixels/nchw"], ["pixels/float"], "pixels/cast", to=TensorProto.FLOAT),
             helper.make_node("BatchNormalization", ["pixels/float", *constants], [INPUT_NAME], "pixels/normalise",
                              epsilon=0.0)]
    graph = helper.make_graph(nodes, "pixels",
                              [helper.make_tensor_value_info(PIXELS_NAME, TensorProto.UINT8, [batch, r, r, 3])],
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, r, r])],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=list(like.opset_import), ir_version=like.ir_version)
    onnx.checker.check_model(model)
    return model


class DetectionParts(NamedTuple):
    """A detection graph cut at its named tensors: pixels ("image" -> "input"; None in a graph that takes the
    normalised batch), network ("input" -> the heads) and post-processing (the heads -> detections; None: raw)."""

    pixels: object | None
    network: object
    post: object | None


def split_detection_graph(proto) -> DetectionParts:
    """The parts of a joined detection graph (mnv2's, with or without post-processing or the pixel input)."""
    onnx = optional_import("onnx", "export", "ONNX export")
    extractor = onnx.utils.Extractor(proto)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    return DetectionParts(
        extractor.extract_model([PIXELS_NAME], [INPUT_NAME]) if inputs == [PIXELS_NAME] else None,
        extractor.extract_model([INPUT_NAME], list(RAW_OUTPUTS)),
        extractor.extract_model(list(RAW_OUTPUTS), list(DETECTION_OUTPUTS))
        if graph_outputs(proto) == DETECTION_OUTPUTS else None)


def join_detection_parts(parts: DetectionParts):
    """One ModelProto from `parts` (e.g. after the network was quantised), without metadata."""
    onnx = optional_import("onnx", "export", "ONNX export")
    proto = parts.network if parts.post is None else join_detection_graph(parts.network, parts.post)
    if parts.pixels is not None:
        proto = onnx.compose.merge_models(parts.pixels, proto, io_map=[(INPUT_NAME, INPUT_NAME)])
        _dedupe_opsets(proto)
    del proto.metadata_props[:]
    return proto


def _dedupe_opsets(proto) -> None:
    imports = list(dict.fromkeys((o.domain, o.version) for o in proto.opset_import))  # merge_models repeats them
    del proto.opset_import[:]
    for domain, version in imports:
        proto.opset_import.add(domain=domain, version=version)


def join_detection_graph(network, post):
    """One ModelProto: `network`'s heads feed `post` (whose names are prefixed, its outputs keep theirs)."""
    onnx = optional_import("onnx", "export", "ONNX export")
    joined = onnx.compose.merge_models(network, post, io_map=[(h, h) for h in RAW_OUTPUTS], prefix2=_POST_PREFIX)
    renames = {_POST_PREFIX + name: name for name in DETECTION_OUTPUTS}
    for node in joined.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
    for out in joined.graph.output:
        out.name = renames.get(out.name, out.name)
    _dedupe_opsets(joined)
    del joined.metadata_props[:]
    return joined


def graph_outputs(proto) -> tuple[str, ...]:
    return tuple(o.name for o in proto.graph.output)


def detection_onnx(model: nn.Module, config: dict, spec: DetectorSpec, dynamic_batch: bool = True,
                   opset: int = DEFAULT_OPSET, raw: bool = False):
    """The detector as an onnx.ModelProto with metadata: uint8 pixels in, the raw heads (raw=True) or detections
    out."""
    onnx = optional_import("onnx", "export", "ONNX export")
    network = to_onnx(model, spec.resolution, dynamic_batch, opset, output_names=RAW_OUTPUTS)
    post = None if raw else _postprocess_onnx(spec, len(spec.anchors()), dynamic_batch, opset)
    proto = join_detection_parts(DetectionParts(pixels_onnx(spec.preprocess, dynamic_batch, network), network, post))
    set_metadata(proto, spec.metadata(config, graph_outputs(proto)))
    onnx.checker.check_model(proto)
    return proto


# --- the check before writing -------------------------------------------------------------------------------------

@dataclass
class DetectionCheck:
    """How closely onnxruntime reproduces PyTorch: heads (largest |difference| and |value|), the normalised input
    (largest difference from the eval preset's), and detections (largest box difference in input-normalised units,
    largest score difference) over `detections` detections."""

    max_abs_diff: float
    max_abs_output: float
    max_pixel_diff: float = 0.0
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    detections: int = 0


def compare_detections(expected, got, atol: float, what: str) -> tuple[float, float, int]:
    """(largest box difference, largest score difference, detections) of two (boxes, scores, labels, count) tuples;
    a UserError if counts or labels differ, or boxes / scores by more than `atol`."""
    boxes, scores, labels, count = (np.asarray(t) for t in expected)
    g_boxes, g_scores, g_labels, g_count = (np.asarray(t) for t in got)
    if g_boxes.shape != boxes.shape or not np.array_equal(g_count, count):
        raise UserError(f"{what}: {g_count.tolist()} detections per image, PyTorch {count.tolist()}")
    if not np.array_equal(g_labels, labels):
        raise UserError(f"{what}: labels differ from PyTorch's")
    box_diff, score_diff = float(np.abs(g_boxes - boxes).max()), float(np.abs(g_scores - scores).max())
    if not (box_diff <= atol and score_diff <= atol):
        raise UserError(f"{what}: boxes differ from PyTorch by {box_diff:.3g}, scores by {score_diff:.3g} (> {atol:g})")
    return box_diff, score_diff, int(count.sum())


@torch.inference_mode()
def check_detection_graph(model: nn.Module, spec: DetectorSpec, onnx_model: bytes, batches=(1,),
                          atol: float = 1e-4) -> DetectionCheck:
    """onnxruntime against PyTorch, part by part (`split_detection_graph`): the network's heads within `atol`
    (relative) on seeded random images; the pixel part gives the eval preset's normalised batch (within `atol`) on
    random pixels; the post-processing part gives `select_detections`' detections (same counts and labels, boxes
    and scores within `atol`) on probe heads (`probe_heads`); and the whole graph gives exactly what its parts give
    in turn. A UserError if not."""
    onnx = optional_import("onnx", "export", "checking the exported graph")
    ort = optional_import("onnxruntime", "export", "checking the exported graph")
    from torchvision.transforms import v2

    from ..data.transforms import to_float_steps

    parts = split_detection_graph(onnx.load_from_string(onnx_model))
    data = {name: part.SerializeToString() for name, part in parts._asdict().items() if part is not None}
    worst, scale = max_difference(model, data["network"], spec.resolution, batches)
    # Relative to the heads' scale: float32 convolutions err in proportion to their values, and class logits of a
    # confident detector on noise reach 50 and more (a classifier's check stays absolute, mnv2.deploy.export).
    if not worst <= atol * max(1.0, scale):
        raise UserError(f"exported network differs from PyTorch by {worst:.3g} (> {atol:g} x largest |output| "
                        f"{scale:.3g})")
    check = DetectionCheck(worst, scale)
    session = {name: ort.InferenceSession(d, providers=["CPUExecutionProvider"])
               for name, d in {**data, "whole": onnx_model}.items()}
    normalise = v2.Compose(to_float_steps(spec.preprocess.mean, spec.preprocess.std))
    g = torch.Generator().manual_seed(1)
    r = spec.resolution
    for b in batches:
        if parts.post is not None:
            heads = probe_heads(spec, b, g)
            feed = {name: t.numpy() for name, t in zip(RAW_OUTPUTS, heads)}
            box_diff, score_diff, n = compare_detections(spec.select(*heads), session["post"].run(None, feed), atol,
                                                         "exported post-processing")
            check.max_box_diff = max(check.max_box_diff, box_diff)
            check.max_score_diff = max(check.max_score_diff, score_diff)
            check.detections += n
        pixels = torch.randint(0, 256, (b, r, r, 3), dtype=torch.uint8, generator=g)
        x = session["pixels"].run(None, {PIXELS_NAME: pixels.numpy()})[0]
        diff = float(np.abs(x - normalise(pixels.permute(0, 3, 1, 2)).numpy()).max())
        if not diff <= atol:
            raise UserError(f"exported normalisation differs from the eval preset's by {diff:.3g} (> {atol:g})")
        check.max_pixel_diff = max(check.max_pixel_diff, diff)
        heads = session["network"].run(None, {INPUT_NAME: x})
        whole = session["whole"].run(None, {PIXELS_NAME: pixels.numpy()})
        if parts.post is not None:
            compare_detections(session["post"].run(None, dict(zip(RAW_OUTPUTS, heads))), whole, 0.0,
                               "exported graph")
        elif not all(np.array_equal(a, b) for a, b in zip(heads, whole)):
            raise UserError("exported graph: its heads differ from its network part's")
    return check


def probe_heads(spec: DetectorSpec, batch: int, generator: torch.Generator, margin: float = 1e-5, tries: int = 20):
    """(cls_logits, box_deltas) on which two correct implementations of `select_detections` must agree exactly.

    Float32 detections have true ties: sigmoids of different logits round to one value, and whichever of two equal
    scores comes first is the implementation's choice -- so does which one the top-k cut keeps; a pair of boxes at
    IoU 0.6 +- 1e-7 is suppressed or not by rounding. Probe heads avoid both: each anchor scores one class, at a
    distinct level of an even ladder from 0.02 to 0.98 (the others -30, under any threshold), and random box
    offsets are redrawn until no two same-class candidates have an IoU within `margin` of the NMS threshold.
    """
    from torchvision.ops import box_iou, clip_boxes_to_image

    anchors = spec.anchors()
    num_anchors, num_classes = len(anchors), len(spec.class_names)
    k = min(100, num_anchors)
    for _ in range(tries):
        levels = torch.linspace(0.02, 0.98, num_anchors)
        scores = torch.stack([levels[torch.randperm(num_anchors, generator=generator)] for _ in range(batch)])
        labels = torch.randint(1, num_classes + 1, (batch, num_anchors), generator=generator)
        logits = torch.full((batch, num_anchors, num_classes + 1), -30.0)
        logits[..., 0] = 0.0  # background: softmax scores then follow the ladder too (p = e^l / (1 + e^l))
        logits.scatter_(2, labels.unsqueeze(-1), torch.logit(scores).unsqueeze(-1))
        deltas = torch.randn(batch, num_anchors, 4, generator=generator) * 0.5
        decoded = clip_boxes_to_image(BoxCoder().decode(deltas, anchors), (1, 1))  # as select_detections does
        near = False
        for i in range(batch):
            for c in range(1, num_classes + 1):
                mine = (labels[i] == c).nonzero().squeeze(1)
                mine = mine[scores[i, mine].argsort(descending=True)][:k]
                iou = box_iou(decoded[i, mine], decoded[i, mine])
                near |= bool(((iou - spec.iou_threshold).abs() < margin).any())
        if not near:
            return logits, deltas
    raise UserError(f"no probe input without near-threshold overlaps in {tries} draws")


@dataclass
class DetectionExportReport:
    path: Path
    resolution: int
    opset: int
    dynamic_batch: bool
    raw: bool
    check: DetectionCheck
    size_bytes: int


def export_detector(model: nn.Module, config: dict, out: str | Path, dynamic_batch: bool = False,
                    opset: int = DEFAULT_OPSET, raw: bool = False, atol: float = 1e-4) -> DetectionExportReport:
    """Write the detector `model` (config as stored with its weights) to `out` as ONNX, only if onnxruntime agrees
    with PyTorch (`check_detection_graph`); atomic: on any failure nothing appears at `out`."""
    from ..atomic import atomic_write_bytes

    out = check_target(out, opset)
    model = model.eval()
    spec = DetectorSpec.from_config(config, model.num_classes)
    data = detection_onnx(model, config, spec, dynamic_batch, opset, raw).SerializeToString()
    try:
        check = check_detection_graph(model, spec, data, (1, 3) if dynamic_batch else (1,), atol)
    except UserError as e:
        raise UserError(f"{out}: {e}; not written") from None
    atomic_write_bytes(out, data)
    return DetectionExportReport(out, spec.resolution, opset, dynamic_batch, raw, check, len(data))
