"""`mnv2 eval` for detectors: COCOeval's twelve numbers for each weights file, and the detections as a COCO results
file. The split is found as training finds it (the run's data settings, or COCO 2017's / the shapes layout under
--data); the input size, normalisation, label mapping and post-processing come from the weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import UserError


def run_detection(args, files: dict[str, Path], device) -> int:
    from ..data.loader import build_loader
    from ..engine.config import Config
    from ..engine.tasks import evaluate
    from ..engine.tasks.detection import DetectionTask
    from ..eval.coco import save_results
    from ..weights import load_model
    from .eval import _data_root

    if args.save_detections and not Path(args.save_detections).parent.is_dir():
        raise UserError(f"{args.save_detections}: folder {Path(args.save_detections).parent} does not exist")
    if args.run:
        from ..engine.trainer import config_of_run
        base = config_of_run(args.run)
    else:
        base = Config(task="detection")
    root = _data_root(args, task="detection")
    args.split = args.split or base.data.val_split
    results, saved = {}, None
    for label, path in files.items():
        model, meta = load_model(path)
        cfg = _config_for_weights(base, meta, args.split, path)
        task = DetectionTask(cfg, root)
        val = task.val_dataset(meta.get("category_ids"))
        if model.num_classes != len(val.category_ids):
            raise UserError(f"{path}: the model predicts {model.num_classes} classes but {val.annotation_file} "
                            f"has {len(val.category_ids)} categories")
        loader = build_loader(val, args.batch_size, args.workers, collate_fn=task.collate)
        metrics, evaluator = evaluate(task, model.to(device), loader, device, progress=not args.json)
        results[label] = {"weights": str(path), **metrics}
        if not args.json:
            print(f"{label}: {path} on {val.annotation_file} ({len(val)} images)")
            print(evaluator.summary.rstrip())
        if saved is None and args.save_detections:
            saved = save_results(args.save_detections, evaluator.results)
            if not args.json:
                print(f"wrote {len(evaluator.results)} detections of the {label} weights to {saved}")
    if args.json:
        print(json.dumps({"data": str(root), "split": args.split, "results": results}, indent=2))
    return 0


def _config_for_weights(base, meta: dict, split: str, path: Path):
    """The run's (or default) config with what the weights fix: input size, normalisation, post-processing."""
    pre, post = meta.get("preprocess") or {}, meta.get("postprocess") or {}
    if "resolution" not in pre:
        raise UserError(f"{path}: detector weights carry no input resolution in their 'preprocess' settings")
    data = dataclasses.replace(base.data, val_split=split, resolution=int(pre["resolution"]),
                               mean=tuple(pre.get("mean", base.data.mean)), std=tuple(pre.get("std", base.data.std)))
    det = dataclasses.replace(base.detection, loss=post.get("kind", base.detection.loss),
                              score_threshold=float(post.get("score_threshold", base.detection.score_threshold)),
                              nms_iou=float(post.get("iou_threshold", base.detection.nms_iou)),
                              max_detections=int(post.get("max_detections", base.detection.max_detections)))
    model = dataclasses.replace(base.model, kwargs={**base.model.kwargs, **{
        k: v for k, v in meta.get("model_kwargs", {}).items() if k == "anchor_layout"}})
    return dataclasses.replace(base, task="detection", data=data, detection=det, model=model)
