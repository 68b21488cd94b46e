"""Measured peak activation memory and latency of the section 5.1 t-split executor, beside torchvision's eager model.

Memory is measured, not estimated: PyTorch's profiler with `profile_memory=True` records every allocation and free of
the CPU allocator as a "[memory]" event with a signed byte count. Sorted by time, their running sum is the memory held
by tensors allocated during the call; its maximum is the peak. Weights and the input exist before the call, so only
activations (and any scratch tensor an op allocates through PyTorch) are counted. Buffers a library allocates on its
own (oneDNN scratchpads) bypass the allocator and are not seen.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ..errors import UserError
from .report import cpu_name

# The profiler's C++ side (kineto) logs start/stop lines on stderr at its default level; keep CLI output clean.
os.environ.setdefault("KINETO_LOG_LEVEL", "99")


def measure_peak_activation_bytes(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    """Peak bytes held by tensors allocated during `fn(x)` (its output included), read from the allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(x)
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def _round_robin_ms(variants: dict[str, tuple[Callable, torch.Tensor]], repeats: int, warmup: int) -> dict[str, list]:
    """Latency samples (ms) per variant, the variants interleaved so that load on a shared machine hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn, x in variants.values():
                fn(x)
        for _ in range(repeats):
            for name, (fn, x) in variants.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _variants(width: float, resolution: int, splits: list[int], seed: int = 0):
    import torchvision

    from ..deploy import fold_bn, tsplit
    from ..models import create_model

    torch.manual_seed(seed)
    ours = create_model("mobilenet_v2", width_mult=width).eval()
    _randomise_bn(ours)
    tv = torchvision.models.mobilenet_v2(width_mult=width).eval()  # random weights: nothing is downloaded
    _randomise_bn(tv)
    folded = fold_bn(ours)
    folded_cl = fold_bn(ours).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, resolution, resolution)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants = {"torchvision eager": (tv, x), "folded": (folded, x), "folded channels_last": (folded_cl, x_cl)}
    for t in splits:
        variants[f"t-split t={t}"] = (tsplit(ours, t), x)
    return variants


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so folding does real work (fresh BN is the identity)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _measure(variants_for: Callable[[int], dict], resolutions, repeats: int | None, warmup: int) -> list[dict]:
    """Peak activation bytes and latency of every variant `variants_for(resolution)` builds, at every resolution."""
    results = []
    for r in resolutions:
        variants = variants_for(r)
        peaks = {name: measure_peak_activation_bytes(fn, x) for name, (fn, x) in variants.items()}
        n = repeats if repeats is not None else (20 if r <= 512 else 5)
        times = _round_robin_ms(variants, n, warmup)
        for name in variants:
            t = sorted(times[name])
            results.append({"resolution": r, "variant": name, "peak_bytes": peaks[name],
                            "median_ms": statistics.median(t), "p25_ms": t[len(t) // 4],
                            "p75_ms": t[(3 * len(t)) // 4], "repeats": n})
    return results


def _meta(threads: int, width: float, warmup: int, load: float) -> dict:
    from .. import native
    from ..engine.fastpath import allocator_in_use

    # The allocator is recorded: each oneDNN call mallocs and frees small objects, so its fixed cost (and with it
    # the cost of the split's extra calls) depends on it (tcmalloc roughly halves a small depthwise call here).
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads, "width": width,
            "allocator": allocator_in_use(), "split_kernels": native.status(),
            "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"{cpu_name()}", "warmup": warmup, "load_average_at_start": load}


def _start(threads: int | None) -> tuple[int, float]:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


DEFAULT_RESOLUTIONS = (224, 1024)
DEFAULT_SPLITS = (1, 2, 3, 4, 5, 6)


def run(width: float = 1.0, resolutions=DEFAULT_RESOLUTIONS, splits=DEFAULT_SPLITS, repeats: int | None = None,
        threads: int | None = None, warmup: int = 3) -> dict:
    """Peak activation bytes and median latency of every variant at every resolution, batch 1."""
    threads, load = _start(threads)
    results = _measure(lambda r: _variants(width, r, list(splits)), resolutions, repeats, warmup)
    return {"meta": _meta(threads, width, warmup, load), "results": results, "targets": _targets(results)}


BASELINE = "torchvision eager"
_UNSPLIT = ("folded", "folded channels_last", "t-split t=1")


def _fastest_unsplit_ms(rows, unsplit=_UNSPLIT) -> float:
    """The latency baseline of the split: the fastest of our unsplit runs -- the folded model in either layout and the
    split executor itself at t = 1 (same kernels, one slice), so that a faster kernel cannot pass for a cheap split."""
    return min(row["median_ms"] for row in rows if row["variant"] in unsplit)


def _targets(results: list[dict]) -> list[dict]:
    """Issue 4 targets at t = 4: >= 3x lower peak than torchvision eager; latency <= 1.10x our fastest unsplit
    model (`_fastest_unsplit_ms`)."""
    out = []
    for r in sorted({row["resolution"] for row in results}):
        rows = {row["variant"]: row for row in results if row["resolution"] == r}
        if "t-split t=4" not in rows:
            continue
        t4, tv = rows["t-split t=4"], rows[BASELINE]
        base = _fastest_unsplit_ms(rows.values())
        memory_ratio = tv["peak_bytes"] / t4["peak_bytes"]
        latency_ratio = t4["median_ms"] / base
        out.append({"resolution": r, "peak_ratio_vs_torchvision": memory_ratio, "memory_target_met": memory_ratio >= 3,
                    "latency_ratio_vs_unsplit": latency_ratio, "latency_target_met": latency_ratio <= 1.10})
    return out


def format_markdown(report: dict) -> str:
    """The results as a Markdown table (one block per resolution) plus the target lines."""
    baseline = report["meta"].get("baseline", BASELINE)
    unsplit = report["meta"].get("unsplit", _UNSPLIT)
    short = baseline.removesuffix(" eager")
    lines = []
    for r in sorted({row["resolution"] for row in report["results"]}):
        rows = [row for row in report["results"] if row["resolution"] == r]
        tv = next(row for row in rows if row["variant"] == baseline)
        base = _fastest_unsplit_ms(rows, unsplit)
        lines += [f"{r}x{r}, batch 1, {rows[0]['repeats']} timed runs:", "",
                  (f"| variant | peak activations (MB) | {short} peak / this | median ms (p25-p75) | "
                   "this / fastest unsplit |"),
                  "|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['variant']} | {row['peak_bytes'] / 1e6:.2f} | "
                         f"{tv['peak_bytes'] / row['peak_bytes']:.2f}x | {row['median_ms']:.1f} "
                         f"({row['p25_ms']:.1f}-{row['p75_ms']:.1f}) | {row['median_ms'] / base:.2f}x |")
        lines.append("")
    for t in report["targets"]:
        if "best_t" in t:  # a segmentation model (`_segmentation_targets`)
            lines.append(f"- {t['resolution']}: best t = {t['best_t']}: peak {t['peak_bytes'] / 1e6:.2f} MB, "
                         f"{t['peak_ratio_vs_torchvision']:.2f}x lower than {short} eager (target >= 3x: "
                         f"{_met(t['memory_target_met'])}); latency {t['median_ms']:.1f} ms = "
                         f"{t['latency_ratio_vs_unsplit']:.2f}x our fastest unsplit model, "
                         f"{t['speedup_vs_torchvision']:.2f}x faster than {short} eager. Lowest peak: t = "
                         f"{t['lowest_peak_t']}, {t['lowest_peak_bytes'] / 1e6:.2f} MB "
                         f"({t['lowest_peak_ratio_vs_torchvision']:.2f}x lower)")
            continue
        lines.append(f"- {t['resolution']}: t=4 peak {t['peak_ratio_vs_torchvision']:.2f}x lower than torchvision "
                     f"eager (target >= 3x: {_met(t['memory_target_met'])}); latency "
                     f"{t['latency_ratio_vs_unsplit']:.2f}x our fastest unsplit model (target <= 1.10x: "
                     f"{_met(t['latency_target_met'])})")
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --- Mobile DeepLabv3 (paper Table 7): peak activations up to the logits at the output stride ----------------------

SEGMENTERS = ("deeplabv3_mobilenet_v2",)  # the t-split needs bottlenecks: Mobile DeepLabv3 on MobileNetV2
SEGMENTATION_RESOLUTIONS = (512, 1024)
SEGMENTATION_SPLITS = (1, 2, 4, 8, 16)
SEGMENTATION_BASELINE = "torchvision deeplabv3 eager"
_SEGMENTATION_UNSPLIT = ("ours eager", "ours folded channels_last", "t-split t=1")


def _segmentation_variants(width: float, resolution: int, splits: list[int], seed: int = 0) -> dict:
    """Every variant as (x -> class logits at the output stride, x). The final upsampling to the input's size is left
    out on both sides -- its C x H x W output is the same for any network -- so torchvision's models run as their
    forward does up to its F.interpolate (`segmentation.TorchvisionLogitsAtStride`) and ours to
    `forward_logits_at_stride`.
    BN statistics from a few synthetic scenes, as in the latency benchmark (they change no allocation)."""
    from ..deploy import fold_bn, tsplit
    from .segmentation import PEERS, bn_batch, logits_at_stride, ours, synthetic_batch, torchvision_peer

    bn_images = bn_batch(resolution)
    model = ours(width, bn_images=bn_images, seed=seed)
    x = synthetic_batch(1, resolution, seed=0)
    variants = {f"{name} eager": (logits_at_stride(torchvision_peer(builder, bn_images)), x)
                for name, builder in PEERS.items()}
    variants["ours eager"] = (model.forward_logits_at_stride, x)
    folded = fold_bn(model).to(memory_format=torch.channels_last)
    variants["ours folded channels_last"] = (folded.forward_logits_at_stride,
                                             x.contiguous(memory_format=torch.channels_last))
    for t in splits:
        variants[f"t-split t={t}"] = (tsplit(model, t).forward_logits_at_stride, x)
    return variants


def run_segmentation(width: float = 1.0, resolutions=SEGMENTATION_RESOLUTIONS, splits=SEGMENTATION_SPLITS,
                     repeats: int | None = None, threads: int | None = None, warmup: int = 3) -> dict:
    """`run` for Mobile DeepLabv3 (OS 16, no ASPP, 21 classes) beside torchvision's DeepLabV3 and LR-ASPP
    (MobileNetV3-Large), everything up to its logits at the output stride."""
    threads, load = _start(threads)
    results = _measure(lambda r: _segmentation_variants(width, r, list(splits)), resolutions, repeats, warmup)
    meta = {**_meta(threads, width, warmup, load), "model": SEGMENTERS[0], "baseline": SEGMENTATION_BASELINE,
            "unsplit": list(_SEGMENTATION_UNSPLIT)}
    return {"meta": meta, "results": results, "targets": _segmentation_targets(results)}


def _t_of(row: dict) -> int:
    return int(row["variant"].split("=")[1])


def _segmentation_targets(results: list[dict]) -> list[dict]:
    """Issue 12: the t-split at its best t >= 3x below torchvision's deeplabv3_mobilenet_v3_large eager, with its
    latency beside it. The peak falls with every t (the widest slice shrinks) while the calls multiply, so the best t
    is the fastest one whose peak meets the 3x target -- or, if none does, the one with the lowest peak; the lowest
    peak measured is reported beside it."""
    out = []
    for r in sorted({row["resolution"] for row in results}):
        rows = {row["variant"]: row for row in results if row["resolution"] == r}
        splits = [row for name, row in rows.items() if name.startswith("t-split t=")]
        if not splits or SEGMENTATION_BASELINE not in rows:
            continue
        tv = rows[SEGMENTATION_BASELINE]
        lowest = min(splits, key=lambda row: (row["peak_bytes"], _t_of(row)))
        meeting = [row for row in splits if tv["peak_bytes"] >= 3 * row["peak_bytes"]]
        best = min(meeting, key=lambda row: row["median_ms"]) if meeting else lowest
        ratio = tv["peak_bytes"] / best["peak_bytes"]
        out.append({"resolution": r, "best_t": _t_of(best), "peak_bytes": best["peak_bytes"],
                    "peak_ratio_vs_torchvision": ratio, "memory_target_met": ratio >= 3,
                    "median_ms": best["median_ms"],
                    "latency_ratio_vs_unsplit": best["median_ms"] / _fastest_unsplit_ms(rows.values(),
                                                                                       _SEGMENTATION_UNSPLIT),
                    "speedup_vs_torchvision": tv["median_ms"] / best["median_ms"],
                    "lowest_peak_t": _t_of(lowest), "lowest_peak_bytes": lowest["peak_bytes"],
                    "lowest_peak_ratio_vs_torchvision": tv["peak_bytes"] / lowest["peak_bytes"]})
    return out


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} must list positive integers, got {text!r}")
    return values


def main(args) -> int:
    """`mnv2 bench --memory`: MobileNetV2, or Mobile DeepLabv3 on it (`SEGMENTERS`)."""
    segmenter = args.model in SEGMENTERS
    if args.model != "mobilenet_v2" and not segmenter:
        raise UserError(f"--memory benchmarks the t-split executor, which runs mobilenet_v2 and "
                        f"{', '.join(SEGMENTERS)} only; got {args.model!r}")
    splits = _ints(args.splits, "--splits") if args.splits else list(SEGMENTATION_SPLITS if segmenter
                                                                      else DEFAULT_SPLITS)
    resolutions = (_ints(args.resolutions, "--resolutions") if args.resolutions
                   else list(SEGMENTATION_RESOLUTIONS if segmenter else DEFAULT_RESOLUTIONS))
    if min(resolutions) < 32:
        raise UserError(f"--resolutions must be at least 32, got {min(resolutions)}")
    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    report = (run_segmentation if segmenter else run)(args.width, resolutions, splits, args.repeats, args.threads)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = report["meta"]
    what = (f"Mobile DeepLabv3 ({args.model} {meta['width']:g}, OS 16, no ASPP, 21 classes) up to the logits at the "
            "output stride" if segmenter else f"MobileNetV2 {meta['width']:g}")
    print(f"{what}: measured peak activation memory and latency, {meta['threads']} threads, "
          f"{meta['machine']}, torch {meta['torch']}, allocator {meta['allocator']}, split kernels "
          f"{meta['split_kernels']}, {meta['date']}")
    print(format_markdown(report))
    return 0
