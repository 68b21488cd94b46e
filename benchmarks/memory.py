"""Paper section 5.1 benchmark: measured peak activation memory and latency of MobileNetV2 1.0 under the t-split
executor (t = 1..6) at 224x224 and 1024x1024, batch 1, beside torchvision's eager mobilenet_v2 in the same run.

    python benchmarks/memory.py --threads 2 --write BENCHMARKS.md

With --write, the `## Memory (paper section 5.1)` section of that file is replaced (or appended), atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

from mnv2.bench.memory import format_markdown, run
from mnv2.bench.report import replace_section

HEADING = "## Memory (paper section 5.1)"

METHOD = """\
Method. Peak activation memory is read from PyTorch's allocator: `torch.profiler` with `profile_memory=True` records
every CPU allocation and free as a `[memory]` event with a signed size; sorted by time, their running sum is the memory
held by tensors created during one forward pass, and the maximum is the peak (`mnv2.bench.memory.
measure_peak_activation_bytes`). Weights and the input are allocated before the measurement and are not counted;
scratch buffers oneDNN allocates on its own are not seen. Latency: median (and 25th-75th percentile) of N timed forward
passes after 3 warm-up passes of every variant, the variants interleaved run by run so that load on the machine hits
all of them alike, under `torch.inference_mode`, batch 1, fixed intra-op threads. Variants: torchvision
`mobilenet_v2` eager (random weights, random BN statistics), our model with BN folded (`mnv2.deploy.fold_bn`) in NCHW
and channels_last, and `mnv2.deploy.tsplit(model, t)`, which computes every bottleneck (and the stem fused with the first
block) as the t-way split sum of section 5.1, channels_last, one inner slice alive at a time, on the kernels named in
the header line ('native': `mnv2.native`, else the reason they were not used). Targets: at t = 4,
>= 3x lower peak than torchvision eager, latency <= 1.10x our fastest unsplit model -- the fastest of the folded model
(either layout) and the split executor at t = 1, which runs the same kernels on one slice."""


def section(report: dict, command: str, note: str | None = None) -> str:
    meta = report["meta"]
    return "\n".join([
        HEADING, "",
        (f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; "
         f"allocator {meta.get('allocator', 'glibc')}; split kernels {meta.get('split_kernels', 'pytorch')}; "
         f"{meta['date']}; "
         f"1-minute load average at start {meta['load_average_at_start']:.1f}."),
        f"Command: `{command}`", "",
        *([note, ""] if note else []),
        METHOD, "",
        format_markdown(report), ""])


def _reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by the same command with tcmalloc preloaded, unless it already is."""
    from mnv2.engine.fastpath import allocator_in_use, find_tcmalloc

    if allocator_in_use() == "tcmalloc":
        return
    lib = find_tcmalloc()
    if lib is None:
        sys.exit("benchmarks/memory.py: error: --allocator tcmalloc: no libtcmalloc found (Debian/Ubuntu: "
                 "apt-get install libtcmalloc-minimal4)")
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(argv[0]), *argv[1:]], env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 at <= 512 px, 5 above)")
    p.add_argument("--resolutions", default="224,1024")
    p.add_argument("--splits", default="1,2,3,4,5,6")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--note", help="a line printed under the command (e.g. the state of the machine)")
    p.add_argument("--write", metavar="MARKDOWN", help="update this file's memory section (e.g. BENCHMARKS.md)")
    p.add_argument("--allocator", choices=("system", "tcmalloc"), default="system",
                   help="tcmalloc: re-run this script once with tcmalloc preloaded (as `mnv2 train` does); the split's "
                        "many small oneDNN calls each malloc and free, so the allocator moves its latency ratio")
    args = p.parse_args(argv)
    if args.allocator == "tcmalloc":
        _reexec_with_tcmalloc(sys.argv if argv is None else [sys.argv[0], *argv])
    report = run(args.width, [int(r) for r in args.resolutions.split(",")], [int(t) for t in args.splits.split(",")],
                 args.repeats, args.threads)
    command = (f"python benchmarks/memory.py --threads {args.threads} --resolutions {args.resolutions} "
               f"--splits {args.splits} --width {args.width:g}" + (f" --repeats {args.repeats}" if args.repeats else "")
               + (" --allocator tcmalloc" if args.allocator == "tcmalloc" else ""))
    text = section(report, command, args.note)
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
