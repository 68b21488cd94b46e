"""`mnv2 eval`: a run's weights (and its EMA weights) or any weights file on a dataset split: top-1 / top-5 / loss
for a classifier, the COCO summary for a detector (cli/eval_detection.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate trained or imported weights: top-1 / top-5 / loss, COCO AP, or mIoU",
                       description="Evaluate a run (its best weights, and its EMA weights when present) or a weights "
                       "file. A classifier is evaluated on DIR/<split>/<class>/* (top-1, top-5, loss); a detector on "
                       "the COCO-format split (the twelve COCOeval numbers, pycocotools); a segmentation model on the VOC-layout split "
                       "(mIoU, per-class IoU, pixel accuracy at full resolution; --scales/--flip for MF). The preprocessing is the "
                       "one stored with the weights, so imported torchvision / timm / Keras weights are evaluated the "
                       "way they were trained. Without --data, a run is evaluated on the data it was trained on.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a run directory written by `mnv2 train`")
    src.add_argument("--weights", metavar="FILE", help="a .safetensors weights file with its mnv2 config")
    p.add_argument("--data", metavar="DIR", help="ImageFolder, COCO or VOC root (default for --run: the run's data)")
    p.add_argument("--split", default=None, help="split: a folder under DIR for a classifier, COCO's or VOC's split "
                   "name otherwise (default: val, or the run's own val split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data loading worker processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (default auto: CUDA when present, else CPU, as `mnv2 train` chooses)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--save-detections", metavar="FILE.json", help="detector: write the best weights' detections as "
                   "a COCO results file (original category ids, [x, y, w, h] pixels)")
    p.add_argument("--scales", metavar="S1,S2,...", help="segmentation: evaluate at these input scales and average "
                   "the probabilities (the paper's MF: 0.5,0.75,1.0,1.25,1.5,1.75 with --flip); default 1.0")
    p.add_argument("--flip", action="store_true", help="segmentation: also average left-right flipped inputs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import build_classification_loader
    from ..data.transforms import eval_preset_for
    from ..engine.config import Config
    from ..engine.tasks import evaluate
    from ..engine.tasks.classification import ClassificationTask
    from ..weights import load_model, read_config

    files = _weights_files(args)
    device = _device(args.device)
    task = read_config(next(iter(files.values()))).get("task", "classification")
    if args.save_detections and task != "detection":
        raise UserError(f"--save-detections is for detectors; these weights are a {task} model's")
    if (args.scales or args.flip) and task != "segmentation":
        raise UserError(f"--scales / --flip are for segmentation models; these weights are a {task} model's")
    if task == "detection":
        from .eval_detection import run_detection
        return run_detection(args, files, device)
    if task == "segmentation":
        from .eval_segmentation import run_segmentation
        return run_segmentation(args, files, device)
    data = _data_root(args)
    args.split = args.split or "val"
    results = {}
    for label, path in files.items():
        meta = read_config(path)
        pre = meta.get("preprocess")
        if not pre:
            raise UserError(f"{path}: weights carry no 'preprocess' settings (resolution, mean, std, crop_fraction)")
        model, meta = load_model(path)
        transform = eval_preset_for(pre)  # centre crop, or the whole image squashed (Keras models)
        loader = build_classification_loader(data, args.split, transform, args.batch_size, shuffle=False,
                                             num_workers=args.workers)
        _check_classes(path, meta, loader.dataset.classes, model)
        task = ClassificationTask(Config(), data)  # the evaluation loop and metrics `mnv2 train` uses
        metrics, _ = evaluate(task, model.to(device), loader, device, progress=not args.json)
        results[label] = {"weights": str(path), **metrics}
    if args.json:
        print(json.dumps({"data": str(data), "split": args.split, "results": results}, indent=2))
        return 0
    for label, r in results.items():
        print(f"{label:<5} top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  loss {r['loss']:.4f}  "
              f"({r['images']} images of {data / args.split}; {r['weights']})")
    return 0


def _device(name: str):
    """--device as a torch.device: `mnv2 train`'s choice (engine/fastpath.py), and a one-line error for CUDA asked
    for on a machine without it."""
    import torch

    from ..engine import fastpath
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use "
                        "--device cpu")
    return fastpath.pick_device(name)


def _weights_files(args) -> dict[str, Path]:
    if args.weights:
        return {"model": Path(args.weights)}
    run_dir = Path(args.run)
    best = run_dir / "best.safetensors"
    if not best.is_file():
        raise UserError(f"{run_dir}: no best.safetensors (not a finished mnv2 run directory)")
    files = {"best": best}
    if (run_dir / "ema.safetensors").is_file():
        files["ema"] = run_dir / "ema.safetensors"
    return files


def _data_root(args, task: str = "classification") -> Path:
    if args.data:
        root = Path(args.data)
    elif args.run:
        from ..engine.trainer import config_of_run
        cfg = config_of_run(args.run)
        if cfg.data.root:
            root = Path(cfg.data.root)
        else:
            from ..data.synthetic import ensure_demo_dataset
            from ..engine.tasks import DEMO_DATA
            from .train import DEFAULT_DATA
            root = ensure_demo_dataset(DEFAULT_DATA, task=DEMO_DATA[task])
    else:
        raise UserError("--data DIR is needed with --weights")
    if not root.is_dir():
        raise UserError(f"{root}: no such data folder")
    return root


def _check_classes(path: Path, meta: dict, classes: list[str], model) -> None:
    """The weights must have one output per class folder; named classes must also match by name and order."""
    outputs = getattr(model, "num_classes", None)
    if outputs is not None and outputs != len(classes):
        raise UserError(f"{path}: the model has {outputs} outputs but the data has {len(classes)} class folders")
    names = meta.get("class_names")
    if names and len(names) == len(classes) and list(names) != list(classes) and len(classes) < 1000:
        raise UserError(f"{path}: class names {names[:3]}... differ from the data's folders {list(classes)[:3]}...")
