"""Segmentation benchmarks (Mobile DeepLabv3, paper Table 7) -> the `## Segmentation inference` and `## Segmentation
memory` sections of BENCHMARKS.md.

Inference: the on-device model (deeplabv3_mobilenet_v2 1.0, OS 16, no ASPP, 21 classes) at 512x512, batch 1, end to
end -- a preprocessed float input to the per-pixel class map -- on each backend, beside torchvision's
`lraspp_mobilenet_v3_large` and `deeplabv3_mobilenet_v3_large` in the same process, same threads, same input, the
runners taking turns; and every network alone up to its logits at the output stride, the fp32 ones against the
machine's compute floor. Each run is one `mnv2.bench.segmentation.measure` (= `mnv2 bench --model
deeplabv3_mobilenet_v2`).

Memory: measured peak activation memory and latency up to the logits at the output stride, our eager model, its
folded channels_last form and the t-split at each t, beside the two torchvision models measured the same way
(`mnv2.bench.memory.run_segmentation` = `mnv2 bench --memory --model deeplabv3_mobilenet_v2`).

Only these two sections of BENCHMARKS.md are replaced.

    python benchmarks/segmentation.py                                  # 2 threads, both sections (~10 minutes)
    python benchmarks/segmentation.py --repeats 10 --memory-repeats 2 --no-write   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from mnv2.atomic import atomic_write_text
from mnv2.bench.memory import SEGMENTATION_RESOLUTIONS, SEGMENTATION_SPLITS, format_markdown, run_segmentation
from mnv2.bench.report import cpu_name, replace_section
from mnv2.bench.segmentation import (
    BN_IMAGES,
    BN_SIZE,
    CALIB_IMAGES,
    FP32,
    INT8,
    NETWORK,
    PEERS,
    RESOLUTION,
    SPREAD,
    measure,
    ratio,
)

LATENCY_HEADING = "## Segmentation inference"
MEMORY_HEADING = "## Segmentation memory"
ROOT = Path(__file__).resolve().parent.parent
LRASPP, DEEPLAB = PEERS
TARGETS = {LRASPP: 1.5, DEEPLAB: 4.0, "int8": 2.0}  # speed-up aimed for: fp32 vs each peer; int8 vs our fp32

LATENCY_METHOD = f"""\
End to end at batch 1: a preprocessed 512x512 float image (a synthetic scene, ImageNet-normalised) in, the per-pixel
class map out -- the network, its logits upsampled bilinearly to 512x512, the argmax over the 21 classes. A segmenter at
a fixed on-device size has no resize step, and both sides would normalise alike, so preprocessing is left out. Ours is
`deeplabv3_mobilenet_v2` (width 1.0, output stride 16, no ASPP: the paper's on-device model). The peers are
torchvision's `lraspp_mobilenet_v3_large` and `deeplabv3_mobilenet_v3_large` (`weights=None, weights_backbone=None`, no
aux head) in eval mode; their rows are `model(x)["out"].argmax(1)`, so they do the same argmax. Ours are what
`SegmentationPredictor` runs after preprocessing: the backend up to the logits at stride 16 (`torch`: eager;
`torch-fast`: what that backend runs -- BN folded, channels_last; `t-split t=1`: the section 5.1 executor at t = 1;
onnxruntime and OpenVINO: the graph `mnv2 export` writes, which ends there), then `mnv2.deploy.segment.class_map`,
the bilinear upsampling to 512x512 and the argmax fused in one native pass (equal to F.interpolate + argmax, tested;
no 21x512x512 logits tensor). The int8 rows quantise the network (`mnv2.deploy.quantize`, calibrated on
{CALIB_IMAGES} synthetic scenes at 512); the class map is the same fp32 step. Random weights: every model gets BN
statistics from {BN_IMAGES} synthetic scenes at {BN_SIZE} px (the image-pooling branch's BN sees one value per image),
and our logits layer is scaled so a pixel's class logits spread with std {SPREAD:g} (a fresh one ties every class; no
timing changes). Same process, same threads, same input; the runners take turns in ten rounds, and a speed-up is the
median over the rounds of the peer's round median / the row's. `agree` is the share of pixels whose class equals our
eager torch model's; int8's is low with random weights (small class margins, errors that no training has smoothed)
and says little -- int8's quality is mIoU with trained weights (`mnv2.deploy.quantize.segmentation_miou`). The network
rows time
everything up to the logits at the output stride; the compute floor is the network's FLOPs (2 x MAdds,
`mnv2.analysis.count_madds`) over the best fp32 matrix-multiply rate measured in the same run -- onnxruntime's MatMul,
as torch.mm (MKL) reaches only about half of it on this CPU. Timings on a shared machine are noisy: compare rows of one
run, not runs."""

MEMORY_METHOD = """\
Method. Peak activation memory read from PyTorch's allocator events as in `## Memory (paper section 5.1)`
(`mnv2.bench.memory.measure_peak_activation_bytes`), counted up to the logits at the output stride: the final
upsampling, whose 21 x H x W output is the same on both sides, is left out of every row. torchvision's models run their
forward up to its F.interpolate (`backbone` then `classifier`: `mnv2.bench.segmentation.TorchvisionLogitsAtStride`),
ours `forward_logits_at_stride`. Variants: torchvision's `deeplabv3_mobilenet_v3_large` and `lraspp_mobilenet_v3_large`
eager, ours (`deeplabv3_mobilenet_v2` 1.0, OS 16, no ASPP, 21 classes) eager and BN-folded channels_last, and
`mnv2.deploy.tsplit(model, t)` -- the atrous backbone's bottlenecks as t-way split sums, the head whole. BN statistics
from synthetic scenes; latency as in the memory section (median and 25th-75th percentile, variants interleaved run by
run). The best t is the fastest split whose peak is at least 3x below torchvision's DeepLabV3 (the target),
or the lowest peak if none is."""


def run_latency(args) -> list[dict]:
    results = []
    for threads in args.threads:
        t, load = time.time(), os.getloadavg()[0]
        r = measure(1.0, args.resolution, threads, args.backends, args.repeats)
        r["load_average_at_start"] = load
        results.append(r)
        print(f"inference, {threads} thread(s): {time.time() - t:.0f} s", file=sys.stderr)
    return results


def latency_targets(r: dict) -> list[str]:
    rows = {row["backend"]: row for row in r["rows"]}
    fp32 = [n for n in FP32 if n in rows]
    int8 = [n for n in INT8 if n in rows]
    lines = []
    if fp32:
        best = max(fp32, key=lambda n: rows[n]["speedup"][LRASPP])
        got = [f"{rows[best]['speedup'][p]:.2f}x {p} (target >= {TARGETS[p]:g}x: "
               f"{'met' if rows[best]['speedup'][p] >= TARGETS[p] else 'NOT met'})" for p in PEERS]
        lines.append(f"- fp32 end to end ({best}, our fastest fp32): {'; '.join(got)}")
        if int8:
            fast8 = max(int8, key=lambda n: ratio(r, best, n))
            speed = ratio(r, best, fast8)
            met = "met" if speed >= TARGETS["int8"] else "NOT met"
            net = (f"; network alone {ratio(r, best + NETWORK, fast8 + NETWORK):.2f}x"
                   if best + NETWORK in rows and fast8 + NETWORK in rows else "")
            lines.append(f"- int8 end to end ({fast8}): {speed:.2f}x faster than {best} (target >= "
                         f"{TARGETS['int8']:g}x: {met}){net}")
    nets = [rows[n + NETWORK] for n in fp32 if n + NETWORK in rows]
    if nets:
        fastest = min(nets, key=lambda row: row["median_ms"])
        peak = max(r["matmul_gflops"].values())
        lines.append(f"- fastest fp32 network ({fastest['backend'].removesuffix(NETWORK)}): "
                     f"{fastest['median_ms']:.2f} ms against a compute floor of {r['floor_ms']:.2f} ms = "
                     f"{100 * fastest['floor_fraction']:.0f}% of the machine's fp32 matmul peak ({peak:.0f} GFLOP/s "
                     f"measured in this run; " + ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_gflops"].items())
                     + ")")
    return lines


def render_latency(results: list[dict], args) -> str:
    command = " ".join(["python benchmarks/segmentation.py", f"--threads {','.join(map(str, args.threads))}",
                        f"--repeats {args.repeats}"] + ([f"--resolution {args.resolution}"]
                                                        if args.resolution != RESOLUTION else []))
    lines = [LATENCY_HEADING, "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
             (f"Command: `{command}` (a single run: `mnv2 bench --model deeplabv3_mobilenet_v2 --resolution "
              f"{args.resolution} --threads 2`)."), "", LATENCY_METHOD, ""]
    if args.note:
        lines += [f"**Note.** {args.note}", ""]
    for r in results:
        madds = ", ".join(f"{name.removeprefix('torchvision ')} {m / 1e9:.2f}G" for name, m in r["peer_madds"].items())
        lines += [(f"### Mobile DeepLabv3 (MobileNetV2 {r['width']:g}, OS {r['output_stride']}, "
                   f"{'ASPP' if r['aspp'] else 'no ASPP'}) @{r['resolution']}, {r['num_classes']} classes, "
                   f"{'trained' if r['trained'] else 'random'} weights, {r['threads']} thread(s) "
                   f"({r['madds'] / 1e9:.2f}G MAdds; torchvision {madds})"), "",
                  (f"{r['repeats']} timed runs per row"
                   + (f"; 1-minute load average at start {r['load_average_at_start']:.1f}."
                      if "load_average_at_start" in r else ".")), "",
                  "| end to end | median ms | p90 ms | vs lraspp | vs deeplabv3 | agree |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            if row["kind"] == "end-to-end":
                agree = f"{100 * row['agreement']:.1f}%" if row["agreement"] is not None else "-"
                lines.append(f"| {row['backend']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                             f"{row['speedup'][LRASPP]:.2f}x | {row['speedup'][DEEPLAB]:.2f}x | {agree} |")
        lines += ["", ("| network alone (to the logits at stride) | median ms | p90 ms | vs lraspp | vs deeplabv3 "
                       "| floor / median |"), "|---|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            if row["kind"] == "network":
                floor = f"{100 * row['floor_fraction']:.0f}%" if row["floor_fraction"] is not None else "-"
                lines.append(f"| {row['backend'].removesuffix(NETWORK)} | {row['median_ms']:.2f} | "
                             f"{row['p90_ms']:.2f} | {row['speedup'][LRASPP]:.2f}x | {row['speedup'][DEEPLAB]:.2f}x "
                             f"| {floor} |")
        floor = (f"Compute floor of our network: {2 * r['madds'] / 1e9:.2f} GFLOP / "
                 f"{max(r['matmul_gflops'].values()):.0f} GFLOP/s = {r['floor_ms']:.2f} ms.")
        lines += ["", floor, "", *latency_targets(r), ""]
    return "\n".join(lines)


def render_memory(report: dict, args) -> str:
    meta = report["meta"]
    command = (f"python benchmarks/segmentation.py --threads {meta['threads']} --memory-resolutions "
               f"{','.join(map(str, args.memory_resolutions))} --splits {','.join(map(str, args.splits))}"
               + (f" --memory-repeats {args.memory_repeats}" if args.memory_repeats else ""))
    return "\n".join([
        MEMORY_HEADING, "",
        (f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; allocator "
         f"{meta['allocator']}; split kernels {meta['split_kernels']}; {meta['date']}; 1-minute load average at start "
         f"{meta['load_average_at_start']:.1f}."),
        (f"Command: `{command}` (a single run: `mnv2 bench --memory --model deeplabv3_mobilenet_v2 --resolutions "
         f"{','.join(map(str, args.memory_resolutions))} --splits {','.join(map(str, args.splits))}`)"), "",
        *([f"**Note.** {args.note}", ""] if args.note else []),
        MEMORY_METHOD, "", format_markdown(report), ""])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=_ints, default=[2], help="comma-separated thread counts (default 2)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per inference row (default 30)")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None, help="default: every one installed")
    p.add_argument("--resolution", type=int, default=RESOLUTION, help=f"inference input side (default {RESOLUTION})")
    p.add_argument("--memory-resolutions", type=_ints, default=list(SEGMENTATION_RESOLUTIONS))
    p.add_argument("--splits", type=_ints, default=list(SEGMENTATION_SPLITS), help="t values of the memory run")
    p.add_argument("--memory-repeats", type=int, default=None, help="timed runs (default 20 at <= 512 px, 5 above)")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--from-json", type=Path, default=None, help="render results saved by --json instead of measuring")
    p.add_argument("--note", default=None, help="a remark printed under each section's heading")
    p.add_argument("--no-write", action="store_true", help="print the sections; do not touch BENCHMARKS.md")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
    else:
        saved = {"inference": None if args.skip_inference else run_latency(args), "memory": None}
        if not args.skip_memory:
            t = time.time()
            saved["memory"] = run_segmentation(1.0, args.memory_resolutions, args.splits, args.memory_repeats,
                                               args.threads[-1])
            print(f"memory: {time.time() - t:.0f} s", file=sys.stderr)
        if args.json:
            atomic_write_text(args.json, json.dumps(saved, indent=2))
    sections = []
    if saved.get("inference"):
        sections.append((LATENCY_HEADING, render_latency(saved["inference"], args)))
    if saved.get("memory"):
        sections.append((MEMORY_HEADING, render_memory(saved["memory"], args)))
    for heading, text in sections:
        if args.no_write:
            print(text)
        else:
            replace_section(args.out, heading, text)
            print(f"wrote the {heading[3:]} section of {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
