"""Segmentation latency at batch 1 per backend, end to end, beside torchvision's two MobileNetV3 segmenters in the same
process, on the same input, with the same thread count, the runners taking turns (`latency.time_runners`).

End to end means a preprocessed float image [1, 3, R, R] in, the per-pixel class map [1, R, R] out: the network, its
logits upsampled to the input's size, the argmax over classes. There is no image decoding or resize in it: a
segmenter at a fixed on-device size (Mobile DeepLabv3 at 512 x 512, paper section 6.3) is fed a normalised frame,
and both sides would do the same normalisation. torchvision's `lraspp_mobilenet_v3_large` and
`deeplabv3_mobilenet_v3_large` (random weights, no aux head) return {"out": upsampled logits}; their rows include the
same argmax, so both sides do the same work.

Where the class map is taken:
  torchvision rows     `model(x)["out"].argmax(1)`: its forward upsamples to R x R, then the argmax.
  our rows             what `SegmentationPredictor` runs after preprocessing: the backend up to the class logits at
                       the output stride (what an exported graph gives, mnv2.deploy.export_segmentation), then
                       `mnv2.deploy.segment.class_map` -- the bilinear upsampling to R x R (align_corners=False) and
                       the argmax fused in one native pass, equal to F.interpolate + argmax (tested), without the
                       21 x R x R logits tensor. `torch` is the eager model's at-stride forward, then the same.
  int8                 the network to the stride-16 logits quantised (mnv2.deploy.quantize on `CALIB_IMAGES`
                       synthetic scenes), the class map the same fp32 step.

The network rows time each backend up to the logits at the output stride (what `count_madds` counts) and set the fp32
ones against the compute floor: the network's FLOPs (2 x MAdds) over the best fp32 matrix-multiply rate measured in
the same run -- the better of torch.mm and onnxruntime's MatMul, because on this CPU torch.mm (MKL) reaches only about
half of what onnxruntime's MLAS kernels reach (its AVX-512 path), so torch.mm alone would put the floor 2x too high.

Random weights with BatchNorm statistics from a few synthetic scenes on every model (`set_bn_statistics`), so that
activations have realistic ranges.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..analysis import count_madds
from ..errors import UserError
from .floor import floor_line, peaks_around
from .latency import common_options, set_bn_statistics, time_runners

RESOLUTION = 512  # the on-device input of Mobile DeepLabv3 (paper section 6.3 evaluates at 513)
NUM_CLASSES = 21  # PASCAL VOC, background included
# Synthetic scenes for BN statistics: the image-pooling branch's BN sees one value per image and channel, and with
# a handful of images its variance is so small that another image's pooled features come out 10-100x too large.
BN_IMAGES, BN_SIZE = 16, 256
CALIB_IMAGES = 4  # synthetic scenes at the bench resolution for int8 calibration
SPREAD = 2.0  # standard deviation of a pixel's class logits after `spread_logits` (random weights)
# row name -> torchvision builder name; the first is the baseline of `speedup`
PEERS = {"torchvision lraspp": "lraspp_mobilenet_v3_large", "torchvision deeplabv3": "deeplabv3_mobilenet_v3_large"}
SPLIT = "t-split t=1"  # our model on the section 5.1 executor at t = 1 (the native kernels of torch-fast's MobileNetV2)
FP32 = ("torch", "torch-fast", SPLIT, "onnxruntime", "openvino")
INT8 = ("onnxruntime-int8", "openvino-int8")
NETWORK = " (network)"


# --- inputs and models ----------------------------------------------------------------------------------------------

def synthetic_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """`n` synthetic photo-like scenes (mnv2.bench.detection.scene), normalised as an ImageNet backbone expects."""
    from ..deploy.preprocess import Preprocess
    from .detection import scene
    return Preprocess(resolution=size, resize="stretch")([scene(size, size, seed + i) for i in range(n)])


def bn_batch(resolution: int) -> torch.Tensor:
    """The scenes every model's BN statistics come from: `BN_IMAGES` at `BN_SIZE` (or the bench size if smaller)."""
    return synthetic_batch(BN_IMAGES, min(BN_SIZE, resolution), seed=1000)


def ours(width: float = 1.0, num_classes: int = NUM_CLASSES, output_stride: int = 16, aspp: bool = False,
         bn_images: torch.Tensor | None = None, seed: int = 0, name: str = "deeplabv3_mobilenet_v2") -> nn.Module:
    """Our Mobile DeepLabv3 with random weights, in eval mode; with `bn_images`, BN statistics of those images and
    the logits layer scaled so that a pixel's class logits spread like a trained model's (`spread_logits`)."""
    from ..models import create_model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = create_model(name, num_classes=num_classes, width_mult=width, output_stride=output_stride, aspp=aspp)
    if bn_images is None:
        return net.eval()
    return spread_logits(set_bn_statistics(net, bn_images), bn_images)


def spread_logits(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Scale the logits conv so that the class logits of a pixel vary with a standard deviation of `SPREAD` on `x`.
    A fresh logits layer (TF DeepLab's init, std 0.01) gives every class nearly the same logit, so the class map
    is decided by rounding noise and int8's agreement with fp32 means nothing; scaling changes no timing."""
    with torch.inference_mode():
        std = float(model.forward_logits_at_stride(x).std(dim=1).mean())
    with torch.no_grad():
        model.logits.weight.mul_(SPREAD / max(std, 1e-12))
    return model


def torchvision_peer(builder: str, bn_images: torch.Tensor | None = None, num_classes: int = NUM_CLASSES,
                     seed: int = 0) -> nn.Module:
    """torchvision's `builder` (a segmentation model), random weights (nothing downloaded), BN statistics of
    `bn_images`."""
    from torchvision.models import segmentation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(segmentation, builder)(weights=None, weights_backbone=None, num_classes=num_classes)
    return set_bn_statistics(model, bn_images) if bn_images is not None else model.eval()


class TorchvisionLogitsAtStride(nn.Module):
    """A torchvision segmentation model's forward up to its low-resolution logits: what its `forward` computes before
    the final F.interpolate. LRASPP's classifier takes the backbone's {"low", "high"} maps; DeepLabV3's (a
    _SimpleSegmentationModel) the backbone's "out" map (its aux classifier, absent here, is left out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from torchvision.models.segmentation.lraspp import LRASPP
        self.backbone, self.classifier, self.takes_all = model.backbone, model.classifier, isinstance(model, LRASPP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return self.classifier(features if self.takes_all else features["out"])


def logits_at_stride(model: nn.Module):
    """The callable x -> class logits before the upsampling: ours (`forward_logits_at_stride`, also on a t-split
    DeepLab) or a torchvision segmentation model's parts."""
    if hasattr(model, "forward_logits_at_stride"):
        return model.forward_logits_at_stride
    return TorchvisionLogitsAtStride(model)


# --- ONNX graphs: the network to its logits at the output stride ----------------------------------------------------

def network_onnx(model: nn.Module, resolution: int):
    """Our model up to its logits at the output stride, BN folded, input [1, 3, R, R] (a static graph)."""
    from ..deploy.export import to_onnx
    from ..deploy.export_segmentation import LogitsAtStride
    return to_onnx(LogitsAtStride(model.eval()), resolution, dynamic_batch=False)


def int8_network(network, calib: torch.Tensor):
    """The network graph quantised to int8 QDQ (mnv2.deploy.quantize), calibrated on the images of `calib`."""
    import onnx

    from ..deploy.quantize import CalibrationReader, quantize_int8
    with tempfile.TemporaryDirectory(prefix="mnv2-seg-int8-") as work:
        path = quantize_int8(network.SerializeToString(), Path(work) / "int8.onnx",
                             CalibrationReader(x[None].numpy() for x in calib))
        return onnx.load(str(path))


def _runtime(name: str, graph: bytes, threads: int):
    from ..deploy.runtime import OnnxRuntimeBackend, OpenVinoBackend
    return (OpenVinoBackend if name.startswith("openvino") else OnnxRuntimeBackend)(graph, threads)


# --- runners --------------------------------------------------------------------------------------------------------

def _peer_runners(module: nn.Module) -> tuple:
    """A torchvision peer's (end to end, network alone) callables numpy [1, 3, R, R] -> class map / logits at
    stride."""
    at_stride = logits_at_stride(module)

    @torch.inference_mode()
    def end_to_end(x: np.ndarray) -> torch.Tensor:
        return module(torch.from_numpy(x))["out"].argmax(1)

    @torch.inference_mode()
    def network(x: np.ndarray) -> torch.Tensor:
        return at_stride(torch.from_numpy(x))

    return end_to_end, network


def _our_runners(network, beside_runtime: bool = False) -> tuple:
    """Our (end to end, network alone) callables: `network` numpy [1, 3, R, R] -> logits at stride, and the class map
    after it as SegmentationPredictor takes it (`class_map`; after an ONNX runtime on one torch thread, as the
    predictor: `one_torch_thread`)."""
    from ..deploy.runtime import one_torch_thread
    from ..deploy.segment import class_map

    def end_to_end(x: np.ndarray) -> torch.Tensor:
        logits = network(x)
        logits = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
        with one_torch_thread() if beside_runtime else contextlib.nullcontext():
            return class_map(logits, x.shape[-2:])

    return end_to_end, network


def _torch_network(module: nn.Module, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    at_stride = logits_at_stride(module)

    @torch.inference_mode()
    def network(x: np.ndarray) -> torch.Tensor:
        return at_stride(torch.from_numpy(x).contiguous(memory_format=fmt))

    return network


def build_runners(model: nn.Module, backends: list[str], threads: int, resolution: int, calib: torch.Tensor,
                  peers: dict[str, nn.Module]) -> dict:
    """{row name: callable(x numpy)}: the torchvision peers and each of our backends end to end (-> class map), then
    every one of them up to its logits at the output stride (`NETWORK` rows)."""
    from ..deploy.runtime import fast_module
    from ..deploy.tsplit import tsplit

    pairs = {name: _peer_runners(peer) for name, peer in peers.items()}
    graphs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in backends:
            if name == "torch":
                pairs[name] = _our_runners(_torch_network(model, False))
            elif name == "torch-fast":  # what build_backend("torch-fast") runs
                pairs[name] = _our_runners(_torch_network(fast_module(model).to(memory_format=torch.channels_last),
                                                          True))
            elif name == SPLIT:
                pairs[name] = _our_runners(_torch_network(tsplit(model, 1), True))
            elif name in ("onnxruntime", "openvino", *INT8):
                if "fp32" not in graphs:
                    graphs["fp32"] = network_onnx(model, resolution)
                key = "int8" if name in INT8 else "fp32"
                if key not in graphs:
                    graphs[key] = int8_network(graphs["fp32"], calib)
                # backends are callables numpy -> their first output
                pairs[name] = _our_runners(_runtime(name, graphs[key].SerializeToString(), threads), True)
            else:
                raise UserError(f"unknown backend {name!r}; expected one of {', '.join(all_backends())}")
    runners = {name: pair[0] for name, pair in pairs.items()}
    runners.update({name + NETWORK: pair[1] for name, pair in pairs.items()})
    return runners


def all_backends() -> tuple[str, ...]:
    """Our backends (torch-compile left out: tens of seconds to compile), the t-split beside torch-fast."""
    from ..deploy.runtime import BACKENDS
    names = [b for b in BACKENDS if b != "torch-compile"]
    return tuple(names[:names.index("torch-fast") + 1] + [SPLIT] + names[names.index("torch-fast") + 1:])


def default_backends() -> list[str]:
    from ..deploy.runtime import is_installed
    return [b for b in all_backends() if b == SPLIT or is_installed(b)]


def splittable(model: nn.Module) -> bool:
    """Whether `tsplit` can run the model: bottleneck blocks, i.e. a MobileNetV2 backbone."""
    from ..models.mobilenetv2 import MobileNetV2
    return isinstance(getattr(model, "backbone", None), MobileNetV2)


def _as_numpy(out) -> np.ndarray:
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


# --- the benchmark --------------------------------------------------------------------------------------------------

def _kind(name: str) -> str:
    return "network" if name.endswith(NETWORK) else "end-to-end"


def measure(width: float = 1.0, resolution: int = RESOLUTION, threads: int = 2, backends: list[str] | None = None,
            repeats: int = 30, num_classes: int = NUM_CLASSES, model: nn.Module | None = None,
            model_name: str = "deeplabv3_mobilenet_v2") -> dict:
    """One run: torchvision's LR-ASPP and DeepLabV3 (MobileNetV3-Large) and each of our backends, end to end and
    network alone. `model`: these weights (e.g. trained ones) instead of random ones."""
    explicit = backends is not None
    backends = list(backends) if explicit else default_backends()
    for b in backends:
        if b not in all_backends():
            raise UserError(f"unknown backend {b!r}; expected one of {', '.join(all_backends())}")
    torch.set_num_threads(threads)
    bn = bn_batch(resolution)
    calib = synthetic_batch(CALIB_IMAGES, resolution, seed=100)
    x = synthetic_batch(1, resolution, seed=0).numpy()  # the bench input: never one of the BN or calibration scenes
    trained = model is not None
    if model is None:
        model = ours(width, num_classes, bn_images=bn, name=model_name)
    model = model.eval()
    if not splittable(model):
        if SPLIT in backends and explicit:
            raise UserError(f"{SPLIT}: the t-split runs a MobileNetV2 backbone, not {model_name}'s")
        backends = [b for b in backends if b != SPLIT]
    num_classes = model.num_classes
    peers = {name: torchvision_peer(builder, bn, num_classes) for name, builder in PEERS.items()}
    runners = build_runners(model, backends, threads, resolution, calib, peers)
    maps = {name: _as_numpy(run(x)) for name, run in runners.items() if _kind(name) == "end-to-end"}
    with torch.inference_mode():  # `agreement` is the share of pixels whose class is eager PyTorch's
        reference = model(torch.from_numpy(x)).argmax(1).numpy()
    timings, peaks = peaks_around(threads, lambda: time_runners(runners, resolution, 1, repeats, inputs=(x, None)))
    peak = max(peaks.values())
    madds = count_madds(model, resolution)
    floor_ms = 2 * madds / peak / 1e6
    rows = []
    for name in runners:
        t, kind = timings[name], _kind(name)
        base = name.removesuffix(NETWORK)
        # round by round, so that a slow phase of the host counts against both sides of a ratio; a network row
        # against the peer's network row
        suffix = NETWORK if kind == "network" else ""
        speedup = {peer: statistics.median(b / r for b, r in zip(timings[peer + suffix]["round_ms"], t["round_ms"]))
                   for peer in PEERS}
        ours_row = base not in PEERS
        rows.append({"backend": name, "kind": kind, "median_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                     "round_ms": t["round_ms"], "speedup": speedup,
                     "floor_fraction": floor_ms / t["median_ms"] if kind == "network" and base in FP32 else None,
                     "output_shape": list(maps[name].shape) if kind == "end-to-end" else None,
                     "agreement": float((maps[name] == reference).mean()) if kind == "end-to-end" and ours_row
                     else None})
    return {"model": model_name, "width": width, "resolution": resolution, "threads": threads, "repeats": repeats,
            "trained": trained, "num_classes": num_classes, "output_stride": getattr(model, "output_stride", None),
            "aspp": bool(getattr(model, "atrous_rates", ())), "madds": madds,
            "peer_madds": {name: count_madds(peer, resolution) for name, peer in peers.items()},
            "matmul_gflops": peaks, "floor_ms": floor_ms,
            "peers": {n: f"torchvision.models.segmentation.{b}" for n, b in PEERS.items()}, "rows": rows}


def ratio(result: dict, numerator: str, denominator: str) -> float:
    """median over the rounds of numerator's round median / denominator's: how many times faster `denominator` is."""
    rows = {r["backend"]: r for r in result["rows"]}
    return statistics.median(a / b for a, b in zip(rows[numerator]["round_ms"], rows[denominator]["round_ms"]))


def format_table(result: dict) -> str:
    lo, dl = PEERS
    lines = [(f"{result['model']} {result['width']:g} @{result['resolution']} (OS {result['output_stride']}, "
              f"{'ASPP' if result['aspp'] else 'no ASPP'}, {result['num_classes']} classes, "
              f"{result['madds'] / 1e9:.2f}G MAdds, {'trained' if result['trained'] else 'random'} weights), "
              f"{result['threads']} threads, batch 1, {result['repeats']} runs; a preprocessed float input -> the "
              "per-pixel class map"),
             f"{'runner':<34} {'median ms':>10} {'p90 ms':>8} {'vs lraspp':>10} {'vs deeplabv3':>13} {'extra':>16}"]
    for r in result["rows"]:
        if r["kind"] == "network":
            extra = f"{100 * r['floor_fraction']:.0f}% of floor" if r["floor_fraction"] is not None else "-"
        else:
            extra = f"agree {100 * r['agreement']:.2f}%" if r["agreement"] is not None else "-"
        lines.append(f"{r['backend']:<34} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} {r['speedup'][lo]:>9.2f}x "
                     f"{r['speedup'][dl]:>12.2f}x {extra:>16}")
    lines.append(floor_line(result))
    return "\n".join(lines)


def main(args) -> int:
    """`mnv2 bench --model <a segmentation model>`."""
    threads, backends = common_options(args)
    model, name, width = None, args.model, args.width
    if getattr(args, "weights", None):
        from ..weights import load_model
        model, config = load_model(args.weights)
        if not hasattr(model, "forward_logits_at_stride"):
            raise UserError(f"{args.weights}: not a segmentation model's weights")
        name, width = config["model"], config.get("model_kwargs", {}).get("width_mult", 1.0)
    if backends is not None:
        backends = [SPLIT if b == "t-split" else b for b in backends]
    result = measure(width, args.resolution, threads, backends, args.repeats or 30, model=model, model_name=name)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
