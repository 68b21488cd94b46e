"""Inference latency (batch 1: median, p90) and throughput (images/s at batch B) per backend, beside torchvision's
eager mobilenet_v2 in the same process, with the same thread count and the same input.

Random weights with realistic BatchNorm statistics (a few training-mode passes set them): with the initial statistics
activations shrink layer by layer towards zero, which is not what a trained network computes.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

from ..analysis import count_madds
from ..errors import UserError
from ..models import create_model

BASELINE = "torchvision"
PEERS = ("openvino-bf16",)  # a runtime's own default precision, shown for comparison, not one of our backends


def set_bn_statistics(model: nn.Module, x: torch.Tensor, passes: int = 2) -> nn.Module:
    """Set every BatchNorm's running statistics to those of `x` (training-mode passes); returns the model in eval."""
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for m in momenta:
        m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()


def build_runner(name: str, model: nn.Module, resolution: int, threads: int):
    """A callable numpy batch -> logits for backend `name`, or the torchvision baseline / a peer runtime."""
    from ..deploy.export import to_onnx
    from ..deploy.quantize import CalibrationReader
    from ..deploy.runtime import OpenVinoBackend, build_backend
    if name == "openvino-bf16":
        return OpenVinoBackend(to_onnx(model, resolution).SerializeToString(), threads, precision="bf16")
    g = torch.Generator().manual_seed(1)
    calibration = lambda: CalibrationReader(
        torch.randn(1, 3, resolution, resolution, generator=g).numpy() for _ in range(8))
    return build_backend(name, model, resolution, threads, calibration)


def time_runners(runners: dict, resolution: int, batch: int, repeats: int, warmup: int = 10,
                 rounds: int = 10, throughput_rounds: int = 3, settle: float = 0.06, inputs: tuple | None = None
                 ) -> dict[str, dict]:
    """Median / p90 batch-1 latency, the median of each round, and batch-`batch` throughput of each runner.

    The runners take turns in `rounds` rounds; in each, a runner makes a few re-warm calls and then its share of the
    timed calls. This host alternates between fast and slow phases lasting seconds (torchvision eager 12 vs 18 ms),
    so short turns make each phase fall on all runners alike, and the per-round medians let a speed-up be taken
    round by round, between runs made seconds apart. Calls of different runners are not interleaved one by one,
    and each turn starts after a `settle` pause: a runtime keeps its thread pool spinning for a while after a call
    (onnxruntime's workers ~40 ms, a whole core; OpenMP and TBB less), and a runner timed inside another's spin
    window shares the cores with it (onnxruntime int8 right after onnxruntime fp32: 3.2 ms instead of 1.8).
    Throughput is timed in the first `throughput_rounds` rounds.

    `inputs`: (single, batched) to call the runners with instead of random [1 | batch, 3, R, R] arrays, e.g. an
    image for end-to-end runners; batched None times no throughput (images_per_s is then None).
    """
    if inputs is None:
        inputs = (np.random.default_rng(0).standard_normal((1, 3, resolution, resolution), dtype=np.float32),
                  np.random.default_rng(1).standard_normal((batch, 3, resolution, resolution), dtype=np.float32))
    x1, xb = inputs
    if xb is None:
        throughput_rounds = 0
    for run in runners.values():
        time.sleep(settle)
        for _ in range(warmup):
            run(x1)
        if xb is not None:
            run(xb)
    rounds = max(1, min(rounds, repeats))
    throughput_rounds = max(1, min(throughput_rounds, rounds)) if throughput_rounds else 0
    times = {name: [] for name in runners}
    per_round = {name: [] for name in runners}
    busy = dict.fromkeys(runners, 0.0)
    calls = max(1, -(-repeats // rounds))
    runs = max(1, -(-max(3, repeats // 10) // throughput_rounds)) if throughput_rounds else 0
    for r in range(rounds):
        for name, run in runners.items():
            time.sleep(settle)
            for _ in range(3):
                run(x1)
            this_round = []
            for _ in range(calls):
                t = time.perf_counter()
                run(x1)
                this_round.append(1e3 * (time.perf_counter() - t))
            times[name] += this_round
            per_round[name].append(statistics.median(this_round))
            if r < throughput_rounds:
                run(xb)
                for _ in range(runs):
                    t = time.perf_counter()
                    run(xb)
                    busy[name] += time.perf_counter() - t
    out = {}
    for name in runners:
        ms = sorted(times[name])
        out[name] = {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
                     "round_ms": per_round[name],
                     "images_per_s": batch * runs * throughput_rounds / busy[name] if throughput_rounds else None}
    return out


def random_model(build, resolution: int, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    return set_bn_statistics(build(), torch.randn(4, 3, resolution, resolution, generator=g))


def measure(model_name: str = "mobilenet_v2", width: float = 1.0, resolution: int = 224, batch: int = 32,
            threads: int = 2, backends: list[str] | None = None, repeats: int = 50,
            model: nn.Module | None = None) -> dict:
    """One benchmark run: the torchvision baseline row first, then each backend. `model`: benchmark these weights
    (e.g. a trained model) instead of random ones."""
    from ..deploy.runtime import BACKENDS, is_installed
    if backends is None:
        backends = [b for b in BACKENDS if b != "torch-compile" and is_installed(b)]
        backends += [p for p in PEERS if is_installed("openvino")]
    for b in backends:
        if b not in BACKENDS and b not in PEERS:
            raise UserError(f"unknown backend {b!r}; expected one of {', '.join(BACKENDS + PEERS)}")
    torch.set_num_threads(threads)
    if model is not None:
        ours = model.eval()
    else:
        ours = random_model(lambda: create_model(model_name, width_mult=width, num_classes=1000), resolution)
    runners = {}
    if model_name == "mobilenet_v2":
        from torchvision.models import mobilenet_v2

        from ..deploy.runtime import TorchBackend
        runners[BASELINE] = TorchBackend(random_model(lambda: mobilenet_v2(width_mult=width), resolution), threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in backends:
            runners[name] = build_runner(name, ours, resolution, threads)
    timings = time_runners(runners, resolution, batch, repeats)
    rows = [{"backend": name, **timings[name]} for name in runners]
    base = rows[0]["round_ms"] if rows and rows[0]["backend"] == BASELINE else None
    for row in rows:
        # round by round, so that a slow phase of the host counts against both sides of a ratio
        row["speedup"] = statistics.median(b / t for b, t in zip(base, row["round_ms"])) if base else None
    return {"model": model_name, "width": width, "resolution": resolution, "threads": threads, "batch": batch,
            "repeats": repeats, "madds": count_madds(ours, resolution), "rows": rows}


def format_table(result: dict) -> str:
    lines = [(f"{result['model']} {result['width']:g} @{result['resolution']} ({result['madds'] / 1e6:.0f}M MAdds), "
             f"{result['threads']} threads; latency at batch 1 ({result['repeats']} runs), throughput at batch "
             f"{result['batch']}"),
             f"{'backend':<18} {'median ms':>10} {'p90 ms':>8} {'images/s':>9} {'vs torchvision':>15}"]
    for r in result["rows"]:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"{r['backend']:<18} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} {r['images_per_s']:>9.1f} "
                     f"{speed:>15}")
    return "\n".join(lines)


def common_options(args) -> tuple[int, list[str] | None]:
    """(threads, backends or None for every installed one) from `mnv2 bench`'s flags, the resolution checked."""
    if args.resolution < 32:
        raise UserError(f"--resolution must be at least 32, got {args.resolution}")
    threads = args.threads or torch.get_num_threads()
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    return threads, [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None


def main(args) -> int:
    """`mnv2 bench` without --memory."""
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    threads, backends = common_options(args)
    model, name, width = None, args.model, args.width
    if getattr(args, "weights", None):
        from ..weights import load_model
        model, config = load_model(args.weights)
        name, width = config["model"], config.get("model_kwargs", {}).get("width_mult", 1.0)
    result = measure(name, width, args.resolution, args.batch, threads, backends, args.repeats or 50, model)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
