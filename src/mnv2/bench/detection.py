"""End-to-end detection latency at batch 1 per backend, beside torchvision's `ssdlite320_mobilenet_v3_large` in the
same process, on the same image, with the same thread count, the runners taking turns (`latency.time_runners`).

End to end means what a caller waits for: a 640x480 uint8 image in, boxes in its pixels out. Ours is
`DetectionPredictor.predict_images` (resize to the square input, normalise -- in the graph on the ONNX backends --,
the network, decode + per-class NMS + the best 100, scaled back to the image); torchvision's is its model in eval
mode (GeneralizedRCNNTransform, the network, its postprocess_detections with batched NMS, scaled back). The
network alone of each backend but eager torch is timed in the same rounds, the fp32 ones set against the machine's
compute floor (its best fp32 matrix-multiply rate, measured in the same run: `mnv2.bench.floor`), and so are the
stages around it (`STAGES`: the preprocessing -- the ONNX backends' graphs take the resized uint8 pixels and
normalise them themselves, the torch backends take the normalised batch -- and decode + NMS on the torch backends).

Random weights make NMS degenerate -- every score equal, or none above a threshold -- so both detectors are set up
to give NMS the same, realistic amount of work on the bench image:
  1. BatchNorm statistics from a few synthetic scenes (`set_bn_statistics`; torchvision's backbone and head, as its
     SSD.forward needs targets in training mode).
  2. The class heads' last convs scaled so the class logits of an anchor vary with a standard deviation of `SPREAD`
     across the image (a fresh head gives every anchor nearly the prior: all ties).
  3. One bias shift of every foreground class logit (a monotone change of every score), found by bisection so that
     the boxes entering NMS on the bench image number `nms_boxes`: for us, per class, the candidates above our
     deployment threshold among that class's best 100 (select_detections); for torchvision, per class, those above
     its score_thresh among its best topk_candidates (SSD.postprocess_detections), all of them then going through
     one batched_nms.
torchvision keeps its defaults (score_thresh 0.001, nms_thresh 0.55, topk_candidates 300, detections_per_img 300,
softmax over 91 classes); ours are the recipe's (sigmoid, NMS IoU 0.6, at most 100 detections) with a deployment
score threshold (`DEPLOY_THRESHOLD`, 0.01) instead of the evaluation-only 1e-8, which would send all
100 candidates of all 80 classes into NMS. With trained weights (--weights) steps 1-3 are skipped for ours and
torchvision's heads are calibrated to the number of boxes our model sends into NMS.
"""

from __future__ import annotations

import json
import statistics
import warnings

import numpy as np
import torch
from torch import nn

from ..analysis import count_madds
from ..errors import UserError
from .floor import floor_line, peaks_around
from .latency import BASELINE, common_options, set_bn_statistics, time_runners

DEPLOY_THRESHOLD = 0.01  # our score threshold in the bench: a deployment one (the config's 1e-8 is for COCO eval)
NMS_BOXES = 1000  # boxes entering NMS per image, for both detectors (on the bench image)
SPREAD = 2.0  # standard deviation of a class logit across the anchors of the image, after scaling the heads
IMAGE_SIZE = (640, 480)  # (width, height) of the bench image: a camera frame, resized by both pipelines
FP32_BACKENDS = ("torch-fast", "onnxruntime", "openvino")
STAGES = ("resize to uint8, ONNX backends (stage)", "resize + normalise, torch backends (stage)",
          "decode + NMS, torch (stage)")
TORCH_NMS = ", NMS in torch"  # the suffix of an ONNX backend's row whose post-processing runs outside the graph
TV_CANDIDATES = 300  # torchvision SSD's topk_candidates (per class)
OUR_CANDIDATES = 100  # select_detections' candidates_per_class


# --- inputs ---------------------------------------------------------------------------------------------------------

def scene(width: int, height: int, seed: int):
    """A synthetic photo-like RGB PIL image: textured background and a few occluding shapes (mnv2.data.shapes)."""
    from PIL import Image

    from ..data.shapes import multi_object_scene
    side = max(width, height)
    image = multi_object_scene(np.random.default_rng((seed, 7)), side, 6, (0.08, 0.28)).image
    return Image.fromarray(np.ascontiguousarray(image[:height, :width]))


def bench_image(seed: int = 0):
    return scene(*IMAGE_SIZE, seed)


def calibration_images(n: int = 8, size: int = 320, seed: int = 100) -> list:
    """Images for BatchNorm statistics and int8 calibration, never the bench image itself."""
    return [scene(size, size, seed + i) for i in range(n)]


# --- the two detectors, with equal NMS work --------------------------------------------------------------------------

def _foreground(conv: nn.Conv2d, slots: int) -> torch.Tensor:
    """Output channels of a class head's conv that hold a foreground class: channel j is slot j % slots (both
    models flatten [N, A_k * slots, H, W] to [N, H * W * A_k, slots]), slot 0 the background."""
    return torch.arange(conv.out_channels) % slots != 0


def _scale_heads(convs: list[nn.Conv2d], logits: torch.Tensor) -> None:
    """Scale the convs' weights so the foreground logits vary across anchors with std ~SPREAD (step 2)."""
    std = float(logits[:, 1:].std(dim=0).mean())
    with torch.no_grad():
        for conv in convs:
            conv.weight.mul_(SPREAD / max(std, 1e-12))


def _shift_heads(convs: list[nn.Conv2d], slots: int, delta: float) -> None:
    with torch.no_grad():
        for conv in convs:
            conv.bias[_foreground(conv, slots)] += delta


def our_nms_boxes(cls_logits: torch.Tensor, score_threshold: float, kind: str = "sigmoid") -> int:
    """Boxes select_detections hands to NMS for one image's logits [A, C + 1]: per class, the candidates above the
    threshold among its best `OUR_CANDIDATES`."""
    logits = cls_logits.float()
    scores = (logits.sigmoid() if kind == "sigmoid" else logits.softmax(-1))[:, 1:]
    k = min(OUR_CANDIDATES, len(scores))
    return int((scores > score_threshold).sum(0).clamp(max=k).sum())


def tv_nms_boxes(cls_logits: torch.Tensor, score_thresh: float, topk: int = TV_CANDIDATES) -> int:
    """Boxes torchvision's SSD.postprocess_detections hands to batched_nms for one image's logits [A, K]."""
    scores = cls_logits.float().softmax(-1)[:, 1:]
    return int((scores > score_thresh).sum(0).clamp(max=topk).sum())


def _calibrate(count, target: int) -> float:
    """The foreground bias shift whose box count `count(delta)` (non-decreasing) comes closest to `target`."""
    lo, hi = -60.0, 60.0
    best = min((lo, hi), key=lambda d: abs(count(d) - target))
    for _ in range(40):
        mid = (lo + hi) / 2
        n = count(mid)
        if abs(n - target) < abs(count(best) - target):
            best = mid
        if n == target:
            break
        lo, hi = (mid, hi) if n < target else (lo, mid)
    return best


def ours(width: float, resolution: int, num_classes: int, images: list, image, nms_boxes: int,
         score_threshold: float, seed: int = 0) -> tuple[nn.Module, dict]:
    """Our SSDLite-MobileNetV2 with random weights set up for the bench (steps 1-3) on `image`, and its config."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..deploy.export_detection import DetectorSpec
    from ..engine.config import DetectionConfig
    from ..models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model("ssdlite_mobilenet_v2", width_mult=width, num_classes=num_classes,
                             image_size=resolution)
    det = DetectionConfig()
    config = {"model": "ssdlite_mobilenet_v2", "task": "detection",
              "model_kwargs": {"width_mult": width, "num_classes": num_classes, "image_size": resolution},
              "preprocess": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resolution": resolution,
                             "resize": "stretch", "interpolation": "bilinear"},
              "postprocess": {"kind": det.loss, "score_threshold": score_threshold, "iou_threshold": det.nms_iou,
                              "max_detections": det.max_detections, "anchor_layout": "tf"}}
    spec = DetectorSpec.from_config(config, num_classes)
    set_bn_statistics(model, spec.preprocess(images))
    x = spec.preprocess([image])
    convs, slots = [h.pred for h in model.cls_heads], num_classes + 1
    logits = lambda: model(x)[0][0]
    with torch.inference_mode():
        _scale_heads(convs, logits())
        base = logits()
    delta = _calibrate(lambda d: our_nms_boxes(base + _shift(base, d), score_threshold, det.loss), nms_boxes)
    _shift_heads(convs, slots, delta)
    return model.eval(), config


def _shift(logits: torch.Tensor, delta: float) -> torch.Tensor:
    shift = torch.full_like(logits[:1], delta)
    shift[:, 0] = 0.0
    return shift


class _TvNetwork(nn.Module):
    """torchvision SSD's network without its transform and post-processing: normalised images -> cls logits."""

    def __init__(self, ssd: nn.Module):
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(list(self.backbone(x).values()))["cls_logits"]


def _to_tensor(image) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F
    return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)


def torchvision_peer(images: list, image, nms_boxes: int, seed: int = 0) -> nn.Module:
    """torchvision's ssdlite320_mobilenet_v3_large, random weights, eval mode, its defaults, set up for the bench."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ssd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    network = _TvNetwork(ssd)
    transformed = lambda ims: ssd.transform([_to_tensor(im) for im in ims])[0].tensors
    with torch.no_grad():
        set_bn_statistics(network, transformed(images))
    ssd.eval()
    convs = [m[-1] for m in ssd.head.classification_head.module_list]
    slots = ssd.head.classification_head.num_columns
    x = transformed([image])
    with torch.inference_mode():
        _scale_heads(convs, network(x)[0])
        base = network(x)[0]
    delta = _calibrate(lambda d: tv_nms_boxes(base + _shift(base, d), ssd.score_thresh, ssd.topk_candidates),
                       nms_boxes)
    _shift_heads(convs, slots, delta)
    return ssd


def torchvision_runner(ssd: nn.Module):
    @torch.inference_mode()
    def run(image):
        return ssd([_to_tensor(image)])[0]
    return run


# --- the benchmark ---------------------------------------------------------------------------------------------------

def build_runners(model: nn.Module, config: dict, backends: list[str], threads: int, calib: list,
                  image) -> dict:
    """{row name: callable(image)}: each backend end to end, the network alone of each fp32 and int8 backend but eager
    torch (on `image` already preprocessed: the graphs' uint8 pixels, torch-fast's normalised batch, their
    normalisation then part of the network row), then the stages around the network alone (`STAGES`)."""
    from ..deploy.detect import DetectionPredictor
    from ..deploy.export_detection import DetectorSpec, detection_onnx
    from ..deploy.quantize import CalibrationReader
    from ..deploy.runtime import build_backend

    spec = DetectorSpec.from_config(config, model.num_classes)
    x, pixels = spec.preprocess([image]).numpy(), spec.preprocess.pixels([image])
    cache = {}

    def graph(raw: bool = False):
        if raw not in cache:
            cache[raw] = detection_onnx(model, config, spec, dynamic_batch=False, raw=raw).SerializeToString()
        return cache[raw]

    runners = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in backends:
            predictor = DetectionPredictor.from_model(model, config, name, threads, batch_size=1,
                                                      calib_images=calib, graph=graph)
            runners[name] = lambda image, p=predictor: p.predict_images([image])
            if not name.startswith("torch"):  # the same network, its post-processing in PyTorch instead
                predictor = DetectionPredictor.from_model(model, config, name, threads, batch_size=1,
                                                          calib_images=calib, graph=graph, nms_in_graph=False)
                runners[f"{name}{TORCH_NMS}"] = lambda image, p=predictor: p.predict_images([image])
        for name in backends:
            if name in FP32_BACKENDS or name.endswith("-int8"):
                calibration = (lambda: CalibrationReader.from_images(calib, spec.preprocess)) if name.endswith(
                    "-int8") else None
                net = build_backend(name, model, spec.resolution, threads, calibration, lambda: graph(raw=True))
                feed = pixels if net.input_dtype == np.uint8 else x
                runners[f"{name} (network)"] = lambda _image, net=net, feed=feed: net.outputs(feed)
    # the fixed stages around the network, alone: DetectionPredictor's preprocessing for either kind of backend, and
    # the torch backends' decode + per-class NMS (the ONNX backends run the same function inside their graph)
    with torch.inference_mode():
        heads = model(torch.from_numpy(x))
    anchors = spec.anchors()
    runners[STAGES[0]] = lambda image: spec.preprocess.pixels([image])
    runners[STAGES[1]] = lambda image: spec.preprocess([image])
    runners[STAGES[2]] = lambda _image: spec.select(*heads, anchors)
    return runners


def _kind(name: str) -> str:
    return "network" if name.endswith("(network)") else "stage" if name in STAGES else "end-to-end"


def measure(width: float = 1.0, resolution: int = 320, threads: int = 2, backends: list[str] | None = None,
            repeats: int = 50, num_classes: int = 80, nms_boxes: int = NMS_BOXES,
            score_threshold: float = DEPLOY_THRESHOLD, model: nn.Module | None = None, config: dict | None = None
            ) -> dict:
    """One run: torchvision's SSDLite end to end, each backend end to end, and our fp32 networks alone."""
    from ..deploy.export_detection import DetectorSpec
    from ..deploy.runtime import BACKENDS, is_installed

    if backends is None:
        backends = [b for b in BACKENDS if b != "torch-compile" and is_installed(b)]
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; expected one of {', '.join(BACKENDS)}")
    if not 0 <= score_threshold < 1:
        raise UserError(f"--score-threshold must be in [0, 1), got {score_threshold}")
    if nms_boxes < 1:
        raise UserError(f"--nms-boxes must be at least 1, got {nms_boxes}")
    torch.set_num_threads(threads)
    image, calib = bench_image(), calibration_images()
    if model is None:
        model, config = ours(width, resolution, num_classes, calib, image, nms_boxes, score_threshold)
        trained = False
    else:
        config = {**config, "postprocess": {**(config.get("postprocess") or {}), "score_threshold": score_threshold}}
        trained = True
    model = model.eval()
    spec = DetectorSpec.from_config(config, model.num_classes)
    x = spec.preprocess([image])
    with torch.inference_mode():
        ours_boxes = our_nms_boxes(model(x)[0][0], spec.score_threshold, spec.kind)
    peer = torchvision_peer(calib, image, ours_boxes if trained else nms_boxes)
    with torch.inference_mode():
        tv_logits = _TvNetwork(peer)(peer.transform([_to_tensor(image)])[0].tensors)[0]
    runners = {BASELINE: torchvision_runner(peer)}
    runners.update(build_runners(model, config, backends, threads, calib, image))
    detections = {name: len(run(image)[0]) for name, run in runners.items()
                  if name != BASELINE and _kind(name) == "end-to-end"}
    detections[BASELINE] = len(runners[BASELINE](image)["boxes"])
    timings, peaks = peaks_around(threads, lambda: time_runners(runners, resolution, 1, repeats,
                                                                 inputs=(image, None)))
    peak = max(peaks.values())
    madds = count_madds(model, resolution)
    floor_ms = 2 * madds / peak / 1e6
    base = timings[BASELINE]["round_ms"]
    rows = []
    for name in runners:
        t = timings[name]
        kind = _kind(name)
        rows.append({"backend": name, "kind": kind,
                     "median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "round_ms": t["round_ms"],
                     # round by round, so that a slow phase of the host counts against both sides of a ratio
                     "speedup": statistics.median(b / r for b, r in zip(base, t["round_ms"]))
                     if kind == "end-to-end" else None,
                     # the floor is an fp32 one: set against fp32 networks only
                     "floor_fraction": floor_ms / t["median_ms"] if kind == "network" and "int8" not in name
                     else None,
                     "detections": detections.get(name)})
    return {"model": config.get("model", "ssdlite_mobilenet_v2"), "width": width, "resolution": resolution,
            "threads": threads, "repeats": repeats, "image": list(IMAGE_SIZE), "trained": trained,
            "num_classes": model.num_classes, "madds": madds, "matmul_gflops": peaks, "floor_ms": floor_ms,
            "workload": {"ours": {"score_threshold": spec.score_threshold, "iou_threshold": spec.iou_threshold,
                                  "max_detections": spec.max_detections, "nms_boxes": ours_boxes},
                         BASELINE: {"score_threshold": peer.score_thresh, "iou_threshold": peer.nms_thresh,
                                    "max_detections": peer.detections_per_img,
                                    "nms_boxes": tv_nms_boxes(tv_logits, peer.score_thresh, peer.topk_candidates)}},
            "peer": "torchvision.models.detection.ssdlite320_mobilenet_v3_large", "rows": rows}


def format_table(result: dict) -> str:
    w = result["workload"]
    lines = [(f"{result['model']} {result['width']:g} @{result['resolution']} ({result['madds'] / 1e6:.0f}M MAdds, "
             f"{'trained' if result['trained'] else 'random'} weights), {result['threads']} threads, batch 1, "
             f"{result['repeats']} runs; a {result['image'][0]}x{result['image'][1]} image end to end"),
             (f"boxes entering NMS: ours {w['ours']['nms_boxes']} (score > {w['ours']['score_threshold']:g}), "
             f"torchvision {w[BASELINE]['nms_boxes']} (score > {w[BASELINE]['score_threshold']:g})"),
             f"{'backend':<32} {'median ms':>10} {'p90 ms':>8} {'vs torchvision':>15} {'detections':>11}"]
    for r in result["rows"]:
        if r["kind"] != "end-to-end":
            extra = f"{100 * r['floor_fraction']:.0f}% of floor" if r["floor_fraction"] is not None else "-"
            dets = "-"
        else:
            extra = f"{r['speedup']:.2f}x"
            dets = str(r["detections"])
        lines.append(f"{r['backend']:<32} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} {extra:>15} {dets:>11}")
    lines.append(floor_line(result))
    return "\n".join(lines)


def main(args) -> int:
    """`mnv2 bench --model <a detector>`."""
    threads, backends = common_options(args)
    model, config, width = None, None, args.width
    if getattr(args, "weights", None):
        from ..weights import load_model
        model, config = load_model(args.weights)
        if config.get("task") != "detection":
            raise UserError(f"{args.weights}: not a detector's weights")
        width = config.get("model_kwargs", {}).get("width_mult", 1.0)
        args.resolution = (config.get("preprocess") or {}).get("resolution", args.resolution)
    result = measure(width, args.resolution, threads, backends, args.repeats or 50, nms_boxes=args.nms_boxes,
                     score_threshold=args.score_threshold, model=model, config=config)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
