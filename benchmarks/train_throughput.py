"""Training throughput (images/s) of MobileNetV2 on this CPU: mnv2's default fast path vs a plain eager fp32 loop.

Each variant runs in its own child process, because the memory allocator (LD_PRELOAD, GLIBC_TUNABLES) and the OpenMP
wait policy can only be chosen when a process starts. Every child trains the same model from the same seed on the same
fixed synthetic batches (forward, backward, SGD step), so the per-step losses show the variants train alike.

    python benchmarks/train_throughput.py                 # full run, writes the "Training throughput" section
    python benchmarks/train_throughput.py --steps 3 --warmup 1 --no-write   # quick check

Variants:
  reference   torchvision's mobilenet_v2, eager fp32, NCHW, glibc malloc defaults: what torchvision's reference
              training script does
  +tunables   reference + glibc tunables (no mmap, no trim) + channels_last
  +tcmalloc   reference + channels_last + tcmalloc preloaded
  fast        mnv2's model as `mnv2 train` runs it: everything `engine/fastpath.py` picks (allocator, channels_last,
              autocast per `amp_dtype("auto")`) and `engine/bf16.py`'s training forward
  fast-fp32   fast with autocast off (float32 throughout)
All start from the same weights (torchvision's network gets mnv2's initial weights through `to_torchvision`).
benchmarks/train_throughput_detection.py runs the detector on this harness (`run_variants`, `timed_steps`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [(1.0, 224, 32), (0.35, 96, 128)]
VARIANTS = ["reference", "+tunables", "+tcmalloc", "fast", "fast-fp32"]


def variant_setup(variant: str):
    """(channels_last, autocast dtype or None) of a variant: every variant but `reference` is channels_last; only
    `fast` autocasts, to what `amp: auto` picks (engine/fastpath.py)."""
    import torch

    from mnv2.engine import fastpath

    dtype = fastpath.amp_dtype("auto", torch.device("cpu")) if variant == "fast" else None
    return variant != "reference", dtype


def timed_steps(model, opt, batches: list, loss_fn, dtype, warmup: int, steps: int) -> dict:
    """`warmup + steps` training steps (forward under autocast to `dtype` + loss, backward, optimizer step) on the
    fixed `batches` in turn: images/s per timed step (median, min, max), the seconds and loss of every step."""
    import torch

    times, losses = [], []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    size = len(batches[0][0])
    rates = [size / t for t in times[warmup:]]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "losses": losses,
            "seconds": [round(t, 3) for t in times]}


def child_report(variant: str, channels_last: bool, dtype, timing: dict) -> str:
    """The child's last stdout line, which `run_child` reads."""
    from mnv2.engine import fastpath

    return json.dumps({"variant": variant, "allocator": fastpath.allocator_in_use(),
                       "amp": str(dtype).replace("torch.", "") if dtype else "fp32", "channels_last": channels_last,
                       **timing})


def child(args) -> None:
    import torch

    from mnv2 import create_model
    from mnv2.engine import bf16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels_last, dtype = variant_setup(args.variant)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model("mobilenet_v2", width_mult=args.width, num_classes=1000)
    if not args.variant.startswith("fast"):  # torchvision's network (nn.ReLU6), with the same initial weights
        from torchvision.models import mobilenet_v2

        from mnv2.interop import to_torchvision
        reference = mobilenet_v2(width_mult=args.width, num_classes=1000)
        reference.load_state_dict(to_torchvision(model))
        model = reference
    model = model.to(memory_format=fmt).train()
    if args.variant.startswith("fast"):
        bf16.enable(model)  # as `mnv2 train` does
    torch.manual_seed(2)  # the same dropout masks whichever network was built
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.res, args.res, generator=g).contiguous(memory_format=fmt),
                torch.randint(0, 1000, (args.batch,), generator=g)) for _ in range(2)]
    loss_fn = lambda m, batch: torch.nn.functional.cross_entropy(m(batch[0]).float(), batch[1])
    print(child_report(args.variant, channels_last, dtype,
                       timed_steps(model, opt, batches, loss_fn, dtype, args.warmup, args.steps)))


def variant_env(variant: str) -> dict:
    from mnv2.engine import fastpath

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "OMP_WAIT_POLICY")}
    env["MNV2_ALLOCATOR"] = "system"
    if variant == "+tunables":
        env["GLIBC_TUNABLES"] = fastpath.GLIBC_TUNABLES
    elif variant == "+tcmalloc":
        lib = fastpath.find_tcmalloc()
        if lib:
            env["LD_PRELOAD"] = lib
    elif variant.startswith("fast"):
        env.pop("MNV2_ALLOCATOR")
        env = fastpath.reexec_env(env) or env  # exactly what `mnv2 train` re-executes itself with
    return env


def run_child(script: str, variant: str, child_args: list[str]) -> dict:
    """Run `script --child --variant VARIANT CHILD_ARGS` in the variant's environment; its last stdout line."""
    cmd = [sys.executable, script, "--child", "--variant", variant, *child_args]
    r = subprocess.run(cmd, env=variant_env(variant), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{Path(script).name} --variant {variant} failed:\n{r.stderr[-3000:]}")
    if r.stderr.strip():
        print(r.stderr.rstrip(), file=sys.stderr)  # e.g. a --profile table
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_variants(script: str, label: str, child_args: list[str], args) -> list[dict]:
    """Every variant of `args.variants` of one case, each in its own process, printed as it finishes."""
    rows = []
    for variant in args.variants:
        row = run_child(script, variant, child_args + ["--steps", str(args.steps), "--warmup", str(args.warmup),
                                                       "--threads", str(args.threads)])
        print(f"  {label}, {variant:<10} {row['median']:7.1f} img/s ({row['min']:.1f}-{row['max']:.1f}; "
              f"{row['allocator']}, {row['amp']}); losses {row['losses']}; seconds per step {row['seconds']}",
              flush=True)
        rows.append(row)
    return rows


def run_case(width, res, batch, args) -> list[dict]:
    return run_variants(__file__, f"{width:g} @ {res}, batch {batch}",
                        ["--width", str(width), "--res", str(res), "--batch", str(batch)], args)


def table_rows(model: str, batch: int, rows: list[dict]) -> list[str]:
    """Markdown rows of one case; speed-ups against its first row (the reference)."""
    base = rows[0]["median"]
    return [f"| {model} | {batch} | {r['variant']} | {r['allocator']} | {r['amp']}"
            f"{', channels_last' if r['channels_last'] else ''} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) "
            f"| {r['median'] / base:.2f}x | {r['losses'][-1]} |" for r in rows]


TABLE_HEAD = ["| model | batch | variant | allocator | precision | images/s | speed-up | loss, last step |",
              "|---|---|---|---|---|---|---|---|"]


def markdown(results, args) -> str:
    lines = ["## Training throughput", "",
             (f"`python benchmarks/train_throughput.py --steps {args.steps} --warmup {args.warmup}` "
             f"({args.threads} threads; forward + backward + SGD step on fixed random batches, 1000 classes; "
             f"median images/s over {args.steps} steps after {args.warmup} warm-up steps, min-max in brackets; "
             f"each variant in its own process). Machine: {machine()}; {time.strftime('%Y-%m-%d')}."), "",
             *TABLE_HEAD]
    for (width, res, batch), rows in results:
        lines += table_rows(f"{width:g} @ {res}", batch, rows)
    lines += ["", ("`reference` is a plain eager fp32 NCHW loop with glibc's default malloc (torchvision's reference "
              "script); `fast` is what `mnv2 train` does by default (engine/fastpath.py, engine/bf16.py): tcmalloc, "
              "channels_last and the autocast `amp: auto` picks (bf16 on this CPU, which has AVX512-BF16), with the "
              "strided depthwise convs' input gradient in fp32; `fast-fp32` is the same with autocast off. Same seed and batches in every row: the losses per step agree to about 1e-3 in fp32 (bf16 "
              "rows differ slightly more)."), ""]
    return "\n".join(lines)


def machine() -> str:
    from mnv2.bench.report import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def argument_parser(description: str, variants: list[str]) -> argparse.ArgumentParser:
    """The flags every training-throughput script takes (the parent's and its children's)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fast")
    p.add_argument("--variants", nargs="+", default=variants)
    p.add_argument("--width", type=float)
    p.add_argument("--res", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    return p


def main() -> None:
    p = argument_parser(__doc__, VARIANTS)
    p.add_argument("--cases", default="all", help="'all', '224' or '96'")
    args = p.parse_args()
    if args.child:
        return child(args)
    results = []
    for case in CASES:
        if args.cases != "all" and str(case[1]) != args.cases:
            continue
        results.append((case, run_case(*case, args)))
    text = markdown(results, args)
    print(text)
    if not args.no_write:
        from mnv2.bench.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "## Training throughput", text)


if __name__ == "__main__":
    main()
