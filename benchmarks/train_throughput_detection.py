"""Training throughput (images/s) of SSDLite-MobileNetV2 on this CPU: `mnv2 train --task detection`'s fast path vs a
plain eager fp32 loop of the same detector. The harness is benchmarks/train_throughput.py's (each variant in its own
child process, same seed, same fixed batches, per-step losses reported); this file adds the detector's step.

Every step runs the real training loss: `DetectionTask.loss` (the model's two heads, `encode_targets` matching the
anchors to each image's boxes, `multibox_loss` with hard negatives), on fixed synthetic batches WITH targets (1-4
boxes of random classes per image), and the optimizer of the paper's recipe (coco_ssdlite_mnv2.yaml: RMSProp-TF).

    python benchmarks/train_throughput_detection.py              # both cases, writes "## Detection training throughput"
    python benchmarks/train_throughput_detection.py --steps 2 --warmup 1 --cases small --no-write   # a quick check
    python benchmarks/train_throughput_detection.py --cases small --variants fast --profile --no-write

Cases: the paper's detector, width 1.0 @ 320, batch 24 (the recipe's), 80 classes; and a small one, 0.5 @ 128,
batch 32, 8 classes. Variants (train_throughput.py's):
  reference   eager fp32, NCHW, glibc malloc defaults, no engine/bf16.py
  fast        what `mnv2 train --task detection` does on this CPU: tcmalloc (engine/fastpath.py), channels_last,
              autocast per `amp: auto` (bf16 here), engine/bf16.py's training forward
  fast-fp32   fast with autocast off
(+tunables and +tcmalloc can be asked for with --variants.) --profile makes each child print where a step's time
goes: the phases of DetectionTask.loss timed one by one, and torch.profiler's top operators.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from train_throughput import (
    TABLE_HEAD,
    argument_parser,
    child_report,
    machine,
    run_variants,
    table_rows,
    timed_steps,
    variant_setup,
)

ROOT = Path(__file__).resolve().parents[1]
CASES = {"paper": (1.0, 320, 24, 80), "small": (0.5, 128, 32, 8)}
VARIANTS = ["reference", "fast", "fast-fp32"]
HEADING = "## Detection training throughput"


def synthetic_targets(n: int, num_classes: int, generator) -> list[dict]:
    """Per image 1-4 boxes (xyxy normalised, 5-45% of the side) of random classes, as CocoDetection yields them."""
    import torch

    targets = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=generator))
        centre = 0.1 + 0.8 * torch.rand(k, 2, generator=generator)
        size = 0.05 + 0.4 * torch.rand(k, 2, generator=generator)
        boxes = torch.cat((centre - size / 2, centre + size / 2), dim=1).clamp(0, 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (k,), generator=generator),
                        "iscrowd": torch.zeros(k, dtype=torch.long)})
    return targets


def build(args):
    """(task, model, optimizer, batches, channels_last, dtype) of a child, as `mnv2 train` sets them up."""
    import torch

    import mnv2
    from mnv2.engine import bf16
    from mnv2.engine.config import load_config
    from mnv2.engine.optim import build_optimizer
    from mnv2.engine.tasks.detection import DetectionTask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels_last, dtype = variant_setup(args.variant)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    recipe = Path(mnv2.__file__).parent / "configs" / "coco_ssdlite_mnv2.yaml"
    cfg = load_config(recipe, [f"model.width={args.width}", f"data.resolution={args.res}"])
    task = DetectionTask(cfg, ROOT)
    task.class_names = [f"class_{i}" for i in range(1, args.classes + 1)]  # what datasets() would read
    model = task.build_model().to(memory_format=fmt).train()
    if args.variant.startswith("fast"):
        bf16.enable(model)  # as `mnv2 train` does on the CPU
    opt = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.res, args.res, generator=g).contiguous(memory_format=fmt),
                synthetic_targets(args.batch, args.classes, g)) for _ in range(2)]
    return task, model, opt, batches, channels_last, dtype


def child(args) -> None:
    task, model, opt, batches, channels_last, dtype = build(args)
    timing = timed_steps(model, opt, batches, task.loss, dtype, args.warmup, args.steps)
    if args.profile:
        profile(task, model, opt, batches, dtype, args)
    print(child_report(args.variant, channels_last, dtype, timing))


def profile(task, model, opt, batches, dtype, args, steps: int = 3) -> None:
    """Print (stderr) the median time of each phase of a training step over `steps` steps, DetectionTask.loss taken
    apart as it runs (forward, encode_targets, multibox_loss and its parts, backward, optimizer step), then
    torch.profiler's top operators over `steps` more."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from mnv2.detection import BoxCoder, encode_targets
    from mnv2.detection.loss import classification_loss, hard_negatives, multibox_loss

    det = task.cfg.detection
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        with record_function(name):
            out = fn()
        phases.setdefault(name, []).append(1e3 * (time.perf_counter() - t))
        return out

    def step(images, targets):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            cls_logits, box_deltas = timed("forward", lambda: model(images))
            labels, box_targets = timed("encode_targets", lambda: encode_targets(
                targets, task.anchors, BoxCoder(), iou_threshold=det.match_iou))
            cls_loss = timed("  classification_loss", lambda: classification_loss(cls_logits, labels, det.loss))
            timed("  hard_negatives", lambda: hard_negatives(cls_loss, labels, det.neg_pos_ratio, det.min_negatives))
            loss = timed("multibox_loss", lambda: multibox_loss(
                cls_logits, box_deltas, labels, box_targets, kind=det.loss, neg_pos_ratio=det.neg_pos_ratio,
                min_negatives=det.min_negatives)["loss"])
        opt.zero_grad(set_to_none=True)
        timed("backward", loss.backward)
        timed("optimizer step", opt.step)

    for i in range(steps):  # timed without the profiler, whose overhead falls on the many small ops
        step(*batches[i % len(batches)])
    print(f"--- {args.variant}, {args.width:g} @ {args.res}, batch {args.batch}: median ms per step phase "
          "(the indented parts of multibox_loss are timed again inside it)", file=sys.stderr)
    for name, ms in phases.items():
        print(f"  {name:<22} {statistics.median(ms):8.1f}", file=sys.stderr)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(*batches[i % len(batches)])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)


def markdown(results, args) -> str:
    lines = [HEADING, "",
             (f"`python benchmarks/train_throughput_detection.py --steps {args.steps} --warmup {args.warmup}` "
              f"({args.threads} threads; SSDLite-MobileNetV2, forward + `DetectionTask.loss` (encode_targets + "
              f"multibox_loss) + backward + RMSProp-TF step on two fixed random batches with 1-4 synthetic boxes per "
              f"image; median images/s over {args.steps} steps after {args.warmup} warm-up steps, min-max in "
              f"brackets; each variant in its own process). Machine: {machine()}; {time.strftime('%Y-%m-%d')}."),
             "", *TABLE_HEAD]
    for (width, res, batch, classes), rows in results:
        lines += table_rows(f"{width:g} @ {res}, {classes} classes", batch, rows)
    lines += ["", ("`reference` is a plain eager fp32 NCHW loop of the same detector with glibc's default malloc; "
                   "`fast` is what `mnv2 train --task detection` does by default (engine/fastpath.py, engine/bf16.py: "
                   "tcmalloc if installed, else glibc's malloc tunables; channels_last; bf16 autocast as `amp: auto` "
                   "picks on this CPU, with the strided depthwise "
                   "convs' input gradient in fp32); `fast-fp32` is the same with autocast off. Target: fast >= 2x "
                   "reference. Same seed, weights and batches in every row, so the per-step losses show the variants "
                   "train alike (bf16 rows differ slightly more)."), ""]
    return "\n".join(lines)


def main() -> None:
    p = argument_parser(__doc__, VARIANTS)
    p.add_argument("--classes", type=int)
    p.add_argument("--cases", default="all", choices=["all", *CASES])
    p.add_argument("--profile", action="store_true", help="each child also prints where a step's time goes")
    args = p.parse_args()
    if args.child:
        return child(args)
    results = []
    for name, case in CASES.items():
        if args.cases not in ("all", name):
            continue
        width, res, batch, classes = case
        child_args = ["--width", str(width), "--res", str(res), "--batch", str(batch), "--classes", str(classes)]
        label = f"{width:g} @ {res}, batch {batch}, {classes} classes"
        results.append((case, run_variants(__file__, label, child_args + (["--profile"] if args.profile else []),
                                           args)))
    text = markdown(results, args)
    print(text)
    if not args.no_write:
        from mnv2.bench.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", HEADING, text)


if __name__ == "__main__":
    main()
