"""Choose configs/finetune.yaml by measurement: fine-tune settings on a few hundred images of classes the weights
never saw, against training from scratch.

The stand-in for "ImageNet weights" is a MobileNetV2 0.35 trained on four of the embedded shapes (circle, square,
triangle, star; 960 images at 64 px, the demo recipe). The target set is the four other shapes (hexagon, cross, ring,
crescent) with --per-class training images each, scored on all of their 240 validation images. Every setting runs
with each --seeds; the table gives the mean and the spread (min-max) of the final validation top-1.

    python benchmarks/finetune.py                      # 30 min on a loaded 2-core machine
    python benchmarks/finetune.py --per-class 20 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mnv2.data.shapes import CLASSES
from mnv2.data.synthetic import write_dataset
from mnv2.engine import recipes_dir
from mnv2.engine.finetune import layered_config
from mnv2.engine.trainer import Trainer

# (label, recipe, overrides): the finetune.yaml candidates, the linear probe, and from scratch with the demo recipe.
SETTINGS = [
    ("finetune.yaml (AdamW 3e-3, crops 50-100%, 30 epochs)", "finetune.yaml", []),
    ("  lr 1e-3", "finetune.yaml", ["optim.lr=1e-3"]),
    ("  lr 1e-2", "finetune.yaml", ["optim.lr=1e-2"]),
    ("  15 epochs", "finetune.yaml", ["train.epochs=15"]),
    ("  60 epochs", "finetune.yaml", ["train.epochs=60"]),
    ("  crops of 25-100% (data.scale)", "finetune.yaml", ["data.scale=[0.25, 1.0]"]),
    ("  BN frozen (model.freeze_bn)", "finetune.yaml", ["model.freeze_bn=true"]),
    ("  --freeze backbone (linear probe), lr 1e-2", "finetune.yaml", ["model.freeze=backbone", "optim.lr=1e-2"]),
    ("from scratch, demo recipe, 30 epochs", "demo.yaml", ["train.epochs=30", "data.resolution=64"]),
    ("from scratch, demo recipe, 60 epochs", "demo.yaml", ["train.epochs=60", "data.resolution=64"]),
]


def split_shapes(root: Path, per_class: int) -> tuple[Path, Path]:
    """The demo shapes, written once, split into the pretraining classes (A) and the fine-tuning classes (B)."""
    shapes = write_dataset(root / "shapes", "classify")
    for name, classes, cap in (("A", CLASSES[:4], None), ("B", CLASSES[4:], per_class)):
        for split in ("train", "val"):
            for c in classes:
                target = root / name / split / c
                target.mkdir(parents=True)
                for f in sorted((shapes / split / c).iterdir())[:cap if split == "train" else None]:
                    shutil.copy(f, target / f.name)
    return root / "A", root / "B"


def train(recipe: str, overrides: list[str], data: Path, out: Path) -> tuple[float, float]:
    cfg, _ = layered_config(recipes_dir() / recipe, overrides)
    start = time.perf_counter()
    result = Trainer(cfg, out, data, progress=False, log=lambda *a: None).fit()
    return result.metrics["model"]["top1"], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=50, help="training images per target class (default 50: 200)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [f"train.threads={args.threads}", "data.num_workers=1", "train.checkpoint_every=0"]
    with tempfile.TemporaryDirectory() as tmp:
        a, b = split_shapes(Path(tmp), args.per_class)
        pre_top1, pre_s = train("demo.yaml", common, a, Path(tmp) / "pre")
        weights = Path(tmp) / "pre" / "best.safetensors"
        print(f"pretrained on {CLASSES[:4]}: val top-1 {pre_top1:.3f} ({pre_s:.0f} s)", flush=True)
        rows = []
        for label, recipe, overrides in SETTINGS:
            init = [] if recipe == "demo.yaml" else [f"model.init_weights={weights}"]
            runs = [train(recipe, common + init + overrides + [f"train.seed={s}"], b, Path(tmp) / f"r{len(rows)}_{s}")
                    for s in seeds]
            top1 = [t for t, _ in runs]
            rows.append({"setting": label, "top1": top1, "seconds": statistics.mean(s for _, s in runs)})
            print(f"{label}: {statistics.mean(top1):.3f} ({min(top1):.3f}-{max(top1):.3f}), "
                  f"{rows[-1]['seconds']:.0f} s", flush=True)
    print(f"\nTarget: {CLASSES[4:]}, {args.per_class} training images per class, 240 validation images; seeds "
          f"{seeds}; pretrained val top-1 {pre_top1:.3f}.\n")
    print("| setting | val top-1, mean (min-max) | s per run |\n|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {statistics.mean(r['top1']):.3f} ({min(r['top1']):.3f}-{max(r['top1']):.3f}) | "
              f"{r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"pretrained_top1": pre_top1, "per_class": args.per_class,
                                               "seeds": seeds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
