"""`mnv2 predict`: classify images, detect objects in them and draw the boxes, or segment them and write the masks,
with a run, a weights file or an exported .onnx, on any inference backend. Detection and segmentation models are
recognised from their weights or metadata ("task"); segmentation runs in cli/predict_segmentation.py."""

from __future__ import annotations

import json

from ..errors import UserError
from .export import add_source_args


def register(sub) -> None:
    from ..choices import BACKENDS
    p = sub.add_parser("predict", help="classify images (top-k labels), detect objects (boxes, drawn) or segment "
                       "them (class masks)",
                       description="Classify images with a trained model (--run / --weights) or an exported .onnx "
                       "file (--onnx), using the model's own eval preprocessing and class names; the default backend "
                       "is the fastest one installed. With a detector: list the boxes (original-image pixels, class "
                       "name, score) and with --out draw them on each image. With a segmentation model: list the "
                       "classes present in each image with their pixel fractions and with --out write DIR/<name>.png "
                       "(the class-index mask, VOC palette) and DIR/<name>_overlay.jpg (the mask over the image).")
    add_source_args(p, onnx=True)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="inference backend (default: onnxruntime, "
                   "else OpenVINO, else torch-fast; torch-fast for a detector's or segmentation model's run or "
                   "weights; the -int8 backends need an int8 .onnx from `mnv2 export --int8`)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--resolution", type=int, default=None, help="with --run / --weights: input size override; "
                   "segmentation: run every image stretched to this square size, the mask resized back (default: "
                   "each image at its own size)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", metavar="DIR", help="detector: write each image with its boxes drawn to DIR/<name>.png; "
                   "segmentation: write DIR/<name>.png (mask) and DIR/<name>_overlay.jpg")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="detector: list and draw boxes scoring at least this (default 0.3)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..deploy.runtime import Predictor
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    options = {"backend": args.backend, "threads": args.threads, "batch_size": args.batch_size}
    task = _task(args)
    if task == "detection":
        return _detect(args, options)
    if task == "segmentation":
        from .predict_segmentation import run_segmentation
        return run_segmentation(args, options)
    if args.out:
        raise UserError("--out draws a detector's boxes or writes a segmentation model's masks; this model is a "
                        "classifier")
    if args.onnx:
        if args.resolution is not None:
            raise UserError("--resolution cannot change an exported .onnx file's input size; export it again")
        predictor = Predictor.from_onnx(args.onnx, **options)
    elif args.run:
        predictor = Predictor.from_run(args.run, resolution=args.resolution, **options)
    else:
        predictor = Predictor.from_weights(args.weights, resolution=args.resolution, **options)
    results = predictor.predict(args.images, topk=args.topk)
    if args.json:
        print(json.dumps([{"image": str(path), "backend": predictor.backend_name,
                           "predictions": [p._asdict() for p in preds]} for path, preds in zip(args.images, results)],
                         indent=2))
        return 0
    for path, preds in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{p.name} ({p.label}) {p.prob:.3f}" for p in preds))
    return 0


def _task(args) -> str | None:
    """"detection", "segmentation", or None (a classifier), from the weights' config or the .onnx metadata."""
    from pathlib import Path

    from ..weights import read_config
    if args.onnx:
        from ..deploy.export import META_TASK
        from ..deploy.runtime import inspect_onnx
        return inspect_onnx(args.onnx)[1].get(META_TASK)
    path = Path(args.run) / "best.safetensors" if args.run else Path(args.weights)
    if args.run and not path.is_file():
        return None  # load_source names what is missing
    return read_config(path).get("task")


def _detect(args, options: dict) -> int:
    from pathlib import Path

    from ..deploy.detect import DetectionPredictor, draw_detections
    from ..deploy.preprocess import load_image
    if args.resolution is not None:
        raise UserError("--resolution: a detector runs at the input size it was trained (and exported) at")
    if not 0 <= args.score_threshold <= 1:
        raise UserError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder")
    if args.onnx:
        predictor = DetectionPredictor.from_onnx(args.onnx, **options)
    elif args.run:
        predictor = DetectionPredictor.from_run(args.run, **options)
    else:
        predictor = DetectionPredictor.from_weights(args.weights, **options)
    images = [load_image(p) for p in args.images]  # every file read before anything is written
    results = predictor.predict_images(images, score_threshold=args.score_threshold)
    drawn = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        names = set()
        for path, image, dets in zip(args.images, images, results):
            name = Path(path).stem
            while name in names:  # two inputs with one name in different folders
                name += "_"
            names.add(name)
            drawn[path] = str(draw_detections(image, dets, out / f"{name}.png"))
    if args.json:
        print(json.dumps([{"image": str(path), "backend": predictor.backend_name, "drawn": drawn.get(path),
                           "detections": [{"box": [round(v, 2) for v in d.box], "score": round(d.score, 4),
                                           "label": d.label, "name": d.name, "category_id": d.category_id}
                                          for d in dets]} for path, dets in zip(args.images, results)], indent=2))
        return 0
    for path, dets in zip(args.images, results):
        found = ", ".join(f"{d.name} {d.score:.2f} [{', '.join(f'{v:.0f}' for v in d.box)}]" for d in dets)
        print(f"{path}: {len(dets)} object{'s' if len(dets) != 1 else ''}" + (f": {found}" if dets else "")
              + (f" -> {drawn[path]}" if path in drawn else ""))
    return 0
