"""`mnv2 eval` for segmentation models: one confusion matrix over the split at each image's full resolution, mIoU,
per-class IoU and pixel accuracy for each weights file; `--scales` / `--flip` is the paper's MF evaluation
(probabilities averaged over the scales and their left-right flips). The split is found as training finds it (the
run's data settings, or VOC's / the shapes layout under --data); normalisation and class names come from the
weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import UserError


def parse_scales(text: str | None) -> tuple[float, ...]:
    if not text:
        return (1.0,)
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated numbers, e.g. 0.5,0.75,1.0,1.25,1.5,1.75"
                        ) from None
    if not scales or any(not 0.05 <= s <= 8 for s in scales):
        raise UserError(f"--scales {text!r}: each scale must be between 0.05 and 8")
    return scales


def run_segmentation(args, files: dict[str, Path], device) -> int:
    from ..data.loader import build_loader
    from ..engine.tasks import evaluate
    from ..engine.tasks.segmentation import SegmentationTask
    from ..weights import load_model
    from .eval import _data_root

    scales = parse_scales(args.scales)
    base = _base_config(args)
    root = _data_root(args, task="segmentation")
    args.split = args.split or base.data.val_split
    results = {}
    for label, path in files.items():
        model, meta = load_model(path)
        pre = meta.get("preprocess") or {}
        data = dataclasses.replace(base.data, val_split=args.split, mean=tuple(pre.get("mean", base.data.mean)),
                                   std=tuple(pre.get("std", base.data.std)))
        task = SegmentationTask(dataclasses.replace(base, task="segmentation", data=data), root)
        task.class_names = list(meta.get("class_names") or [])
        val = task.val_dataset()
        if model.num_classes != len(val.class_names):
            raise UserError(f"{path}: the model predicts {model.num_classes} classes but the data has "
                            f"{len(val.class_names)} ({', '.join(val.class_names[:4])}, ...)")
        task.eval_scales, task.eval_flip = scales, args.flip
        loader = build_loader(val, args.batch_size, args.workers, collate_fn=task.collate)
        _, evaluator = evaluate(task, model.to(device), loader, device, progress=not args.json)
        results[label] = {"weights": str(path), "images": len(val), **evaluator.summary}
    if args.json:
        print(json.dumps({"data": str(root), "split": args.split, "scales": list(scales), "flip": args.flip,
                          "results": results}, indent=2))
        return 0
    how = f"scales {','.join(f'{s:g}' for s in scales)}" + (" + flip" if args.flip else "")
    for label, r in results.items():
        print(f"{label}: mIoU {r['mIoU']:.4f}  pixel acc {r['pixel_acc']:.4f}  ({r['images']} images of "
              f"{root}, split {args.split}, {how}; {r['weights']})")
        width = max(len(n) for n in r["per_class"])
        for name, iou in r["per_class"].items():
            print(f"  {name:<{width}}  {'-' if iou is None else f'{iou:.4f}'}")
    return 0


def _base_config(args):
    from ..engine.config import Config

    if args.run:
        from ..engine.trainer import config_of_run
        return config_of_run(args.run)
    return Config(task="segmentation")
