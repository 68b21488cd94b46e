"""Inference benchmark sweep -> the `## Inference` section of BENCHMARKS.md.

Sweeps MobileNetV2 widths 0.35-1.4 (at 224) and resolutions 96-224 (at width 1.0), with 1 and 2 threads; every row is
one `mnv2.bench.latency.measure` run (torchvision's eager mobilenet_v2 as the baseline, same threads, same process).
Then fits latency against MAdds per backend. Only the `## Inference` section of BENCHMARKS.md is replaced; other
sections (e.g. `## Memory`) are kept.

    python benchmarks/inference.py                  # the full sweep (about 20-40 minutes on 2 quiet cores)
    python benchmarks/inference.py --quick          # 0.35 and 1.0 at 96 and 224, 2 threads, few repeats
    python benchmarks/inference.py --grid           # every width x every resolution
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mnv2.atomic import atomic_write_text
from mnv2.bench.latency import measure
from mnv2.bench.report import replace_section

WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)
RESOLUTIONS = (96, 128, 160, 192, 224)
ROOT = Path(__file__).resolve().parent.parent


def cells(args) -> list[tuple[float, int]]:
    if args.quick:
        return [(0.35, 96), (1.0, 96), (0.35, 224), (1.0, 224)]
    if args.grid:
        return [(w, r) for w in WIDTHS for r in RESOLUTIONS]
    axis = [(w, 224) for w in WIDTHS] + [(1.0, r) for r in RESOLUTIONS if r != 224]
    return sorted(set(axis))


def run(args) -> list[dict]:
    results = []
    for threads in args.threads:
        for width, resolution in cells(args):
            t = time.time()
            r = measure("mobilenet_v2", width, resolution, args.batch, threads, args.backends, args.repeats)
            results.append(r)
            print(f"width {width} @{resolution}, {threads} thread(s): {time.time() - t:.0f} s", file=sys.stderr)
    return results


def scaling(results: list[dict]) -> list[dict]:
    """Per backend and thread count: least-squares fit median_ms = a + b * MAdds, and its R^2."""
    fits = []
    backends = {row["backend"] for r in results for row in r["rows"]}
    for threads in sorted({r["threads"] for r in results}):
        for backend in sorted(backends):
            pts = [(r["madds"], row["median_ms"]) for r in results if r["threads"] == threads
                   for row in r["rows"] if row["backend"] == backend]
            if len(pts) < 3:
                continue
            x, y = np.array(pts, dtype=float).T
            b, a = np.polyfit(x / 1e6, y, 1)
            r2 = 1 - ((y - (a + b * x / 1e6)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
            fits.append({"backend": backend, "threads": threads, "ms_per_100M_madds": 100 * b, "intercept_ms": a,
                         "r2": r2, "effective_gmadds_per_s": (x / y).mean() / 1e6})
    return fits


def render(results: list[dict], args) -> str:
    cpu = platform.processor() or platform.machine()
    command = " ".join(["python benchmarks/inference.py"] + (["--quick"] if args.quick else [])
                       + (["--grid"] if args.grid else [])
                       + [f"--threads {','.join(map(str, args.threads))}", f"--batch {args.batch}",
                          f"--repeats {args.repeats}"])
    lines = ["## Inference", "",
             (f"Written by `{command}` on "
              f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {cpu}, {torch.get_num_threads()} cores seen. "
              "Median and p90 latency at batch 1, images/s at batch "
              f"{args.batch}; random weights with realistic BN statistics; torchvision's eager mobilenet_v2 is the "
              "baseline row of every run (same process, same threads). Speed-up = the median over the run's rounds "
              "of torchvision's round median / the backend's (the runners take turns, ten rounds of a few calls "
              "each, so that the host's slow phases count against both sides). "
              "Timings on a shared machine are noisy: compare rows of one run, not runs."), ""]
    if args.note:
        lines += [f"**Note.** {args.note}", ""]
    for r in results:
        lines += [(f"### MobileNetV2 {r['width']:g} @{r['resolution']}, {r['threads']} thread(s) "
                   f"({r['madds'] / 1e6:.0f}M MAdds)"), "",
                  "| backend | median ms | p90 ms | images/s | vs torchvision |", "|---|---:|---:|---:|---:|"]
        for row in r["rows"]:
            speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
            lines.append(f"| {row['backend']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{row['images_per_s']:.1f} | {speed} |")
        lines.append("")
    fits = scaling(results)
    if fits:
        lines += ["### Latency against MAdds", "",
                  ("Least-squares fit of median latency against multiply-adds (mnv2.analysis.count_madds) over the "
                   "swept models. R^2 near 1 means latency follows MAdds; a large intercept is fixed per-call cost "
                   "(framework overhead) that small models cannot amortise."), "",
                  "| backend | threads | ms per 100M MAdds | intercept ms | R^2 | mean GMAdds/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for f in fits:
            lines.append(f"| {f['backend']} | {f['threads']} | {f['ms_per_100M_madds']:.2f} | {f['intercept_ms']:.2f} "
                         f"| {f['r2']:.3f} | {f['effective_gmadds_per_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="four cells, 2 threads")
    p.add_argument("--grid", action="store_true", help="every width x every resolution")
    p.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="comma-separated thread counts (default 1,2; --quick: 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed batch-1 runs per row (default 50; --quick 20)")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None, help="default: every one installed")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--from-json", type=Path, default=None, help="render results saved by --json instead of measuring")
    p.add_argument("--note", default=None, help="a remark printed under the section's heading")
    args = p.parse_args()
    args.threads = args.threads or ([2] if args.quick else [1, 2])
    args.repeats = args.repeats or (20 if args.quick else 50)
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.json and not args.from_json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    replace_section(args.out, "## Inference", render(results, args))
    print(f"wrote the Inference section of {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
