"""Detection inference benchmark -> the `## Detection inference` section of BENCHMARKS.md.

SSDLite-MobileNetV2 1.0 @320 (80 classes) end to end at batch 1 -- a 640x480 image in, boxes in its pixels out --
on each backend, beside torchvision's `ssdlite320_mobilenet_v3_large` (its own transform and NMS) in the same
process, same threads, same image, the runners taking turns; and each fp32 network alone against the machine's
compute floor. Every run is one `mnv2.bench.detection.measure` (= `mnv2 bench --model ssdlite_mobilenet_v2`); its
module docstring says how both detectors are given the same NMS work. Only this section of BENCHMARKS.md is
replaced.

    python benchmarks/detection.py                            # 1 and 2 threads, 50 runs each (~5-10 minutes)
    python benchmarks/detection.py --threads 2 --repeats 10 --no-write   # a quick check
    python benchmarks/detection.py --weights det.safetensors  # also a trained detector's run (real NMS work)
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
from mnv2.bench.detection import DEPLOY_THRESHOLD, NMS_BOXES, TORCH_NMS, measure
from mnv2.bench.latency import BASELINE
from mnv2.bench.report import cpu_name, replace_section

HEADING = "## Detection inference"
ROOT = Path(__file__).resolve().parent.parent
FP32 = ("torch", "torch-fast", "onnxruntime", "openvino", f"onnxruntime{TORCH_NMS}", f"openvino{TORCH_NMS}")
INT8 = ("onnxruntime-int8", "openvino-int8", f"onnxruntime-int8{TORCH_NMS}", f"openvino-int8{TORCH_NMS}")
TARGETS = {"fp32": 3.0, "int8": 6.0}  # end-to-end speed-up over torchvision's SSDLite aimed for


def run(args) -> list[dict]:
    results = []
    sources = [None] + ([args.weights] if args.weights else [])
    for weights in sources:
        model = config = None
        if weights:
            from mnv2.weights import load_model
            model, config = load_model(weights)
        for threads in args.threads:
            t, load = time.time(), os.getloadavg()[0]
            r = measure(1.0, 320, threads, args.backends, args.repeats, nms_boxes=args.nms_boxes,
                        score_threshold=args.score_threshold, model=model, config=config)
            r["load_average_at_start"] = load
            results.append(r)
            print(f"{'trained' if weights else 'random'} weights, {threads} thread(s): {time.time() - t:.0f} s",
                  file=sys.stderr)
    return results


def targets(r: dict) -> list[str]:
    """The target lines of one run: best fp32 and int8 end-to-end speed-ups, and the network against the floor."""
    rows = {row["backend"]: row for row in r["rows"]}
    lines = []
    for kind, names in (("fp32", FP32), ("int8", INT8)):
        got = [(rows[n]["speedup"], n) for n in names if n in rows]
        if got:
            speed, name = max(got)
            met = "met" if speed >= TARGETS[kind] else "NOT met"
            lines.append(f"- {kind} end to end: {speed:.2f}x torchvision ({name}; target >= {TARGETS[kind]:g}x: {met})")
    nets = [row for row in r["rows"] if row["kind"] == "network" and row["floor_fraction"] is not None]
    if nets:
        best = min(nets, key=lambda row: row["median_ms"])
        lines.append(f"- fastest fp32 network ({best['backend'].removesuffix(' (network)')}): {best['median_ms']:.2f} ms "
                     f"against a compute floor of {r['floor_ms']:.2f} ms = {100 * best['floor_fraction']:.0f}% of the "
                     f"machine's best fp32 matmul rate ({', '.join(f'{k} {v:.0f}' for k, v in r['matmul_gflops'].items())} "
                     f"GFLOP/s measured in this run)")
    return lines


def render(results: list[dict], args) -> str:
    command = " ".join(["python benchmarks/detection.py", f"--threads {','.join(map(str, args.threads))}",
                        f"--repeats {args.repeats}"]
                       + ([f"--nms-boxes {args.nms_boxes}"] if args.nms_boxes != NMS_BOXES else [])
                       + ([f"--score-threshold {args.score_threshold:g}"]
                          if args.score_threshold != DEPLOY_THRESHOLD else [])
                       + ([f"--weights {args.weights}"] if args.weights else []))
    lines = [HEADING, "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
             (f"Command: `{command}` (a single run: `mnv2 bench --model ssdlite_mobilenet_v2 --resolution 320 "
             "--threads 2`)."), "",
             ("End to end at batch 1: a 640x480 uint8 image (a synthetic scene) in, boxes in its pixels out. Ours is "
             "`DetectionPredictor` on each backend: resize to 320x320, normalise, the network, decode + per-class "
             "NMS + the best 100 (the ONNX backends' graphs take the resized uint8 pixels and run the rest "
             "themselves; int8 graphs quantised on 8 synthetic scenes, normalisation and NMS kept fp32). The peer is torchvision's `ssdlite320_mobilenet_v3_large(weights=None, "
             "weights_backbone=None)` in eval mode with its own GeneralizedRCNNTransform and NMS, at its defaults "
             "(score_thresh 0.001, nms_thresh 0.55, topk_candidates 300, detections_per_img 300). Same process, "
             "same threads, same image; the runners take turns in ten rounds, and a speed-up is the median over "
             "the rounds of torchvision's round median / the backend's. "
             "Random weights would make NMS degenerate, so both detectors get BN statistics from 8 synthetic "
             "scenes, class heads scaled to a logit spread of 2 across anchors, and one bias shift of the "
             "foreground logits found so that the same number of boxes enters NMS on the bench image "
             "(`mnv2.bench.detection` docstring); our score threshold is a deployment one, not the evaluation "
             "config's 1e-8. The network rows time our networks alone on the preprocessed image (the ONNX ones "
             "from the uint8 pixels, their normalisation included; int8: the quantised network of the int8 graph); the compute floor, for the fp32 ones, is the network's FLOPs "
             "(2 x MAdds) over the best fp32 matrix-multiply rate measured in the "
             "same run (torch.mm's or onnxruntime's MatMul, `mnv2.bench.floor`: MKL's torch.mm reaches about half "
             "of MLAS's rate on this CPU, and a floor from it alone was twice too high). The stage rows time what "
             "surrounds the network, alone: DetectionPredictor's preprocessing (the resize alone before an ONNX "
             "graph; resize + normalise before the torch backends), and the torch backends' decode + "
             "per-class NMS (`select_detections` on the heads). The ONNX backends run that function inside their "
             "graph, or, in the rows marked 'NMS in torch', run the network alone and leave it to PyTorch "
             "(`DetectionPredictor.from_model(..., nms_in_graph=False)`). Timings on a shared machine are noisy: "
             "compare rows of one run, not runs."), ""]
    if args.note:
        lines += [f"**Note.** {args.note}", ""]
    for r in results:
        w = r["workload"]
        lines += [(f"### SSDLite-MobileNetV2 {r['width']:g} @{r['resolution']}, {r['num_classes']} classes, "
                  f"{'trained' if r['trained'] else 'random'} weights, {r['threads']} thread(s) "
                  f"({r['madds'] / 1e6:.0f}M MAdds)"), "",
                  (f"Boxes entering NMS: ours {w['ours']['nms_boxes']} (score > {w['ours']['score_threshold']:g}, "
                  f"IoU {w['ours']['iou_threshold']:g}, at most {w['ours']['max_detections']} kept), torchvision "
                  f"{w[BASELINE]['nms_boxes']} (score > {w[BASELINE]['score_threshold']:g}, IoU "
                  f"{w[BASELINE]['iou_threshold']:g}, at most {w[BASELINE]['max_detections']} kept). "
                  f"{r['repeats']} timed runs per row"
                  + (f"; 1-minute load average at start {r['load_average_at_start']:.1f}."
                     if "load_average_at_start" in r else ".")), "",
                  "| end to end | median ms | p90 ms | vs torchvision | detections |", "|---|---:|---:|---:|---:|"]
        for row in r["rows"]:
            if row["kind"] == "end-to-end":
                lines.append(f"| {row['backend']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                             f"{row['speedup']:.2f}x | {row['detections']} |")
        nets = [row for row in r["rows"] if row["kind"] == "network"]
        if nets:
            lines += ["", "| network alone | median ms | p90 ms | fp32 compute floor ms | floor / median |",
                      "|---|---:|---:|---:|---:|"]
            for row in nets:
                share = "-" if row["floor_fraction"] is None else f"{100 * row['floor_fraction']:.0f}%"
                lines.append(f"| {row['backend'].removesuffix(' (network)')} | {row['median_ms']:.2f} | "
                             f"{row['p90_ms']:.2f} | {r['floor_ms']:.2f} | {share} |")
        stages = [row for row in r["rows"] if row["kind"] == "stage"]
        if stages:
            lines += ["", "| stage alone | median ms | p90 ms |", "|---|---:|---:|"]
            lines += [f"| {row['backend'].removesuffix(' (stage)')} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} |"
                      for row in stages]
        lines += ["", *targets(r), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2],
                   help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per row (default 50)")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None, help="default: every one installed")
    p.add_argument("--nms-boxes", type=int, default=NMS_BOXES, help="boxes entering NMS (random weights)")
    p.add_argument("--score-threshold", type=float, default=DEPLOY_THRESHOLD, help="our deployment threshold")
    p.add_argument("--weights", default=None, help="also benchmark this trained detector (.safetensors)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--from-json", type=Path, default=None, help="render results saved by --json instead of measuring")
    p.add_argument("--note", default=None, help="a remark printed under the section's heading")
    p.add_argument("--no-write", action="store_true", help="print the section; do not touch BENCHMARKS.md")
    args = p.parse_args()
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.json and not args.from_json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    text = render(results, args)
    if args.no_write:
        print(text)
        return 0
    replace_section(args.out, HEADING, text)
    print(f"wrote the {HEADING[3:]} section of {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
