"""`mnv2 predict`: classify images with a run, a weights file or an exported .onnx, on any inference backend."""

from __future__ import annotations

import json

from ..errors import UserError
from .export import add_source_args


def register(sub) -> None:
    from ..deploy.runtime import BACKENDS
    p = sub.add_parser("predict", help="classify images: top-k labels with class names",
                       description="Classify images with a trained model (--run / --weights) or an exported .onnx "
                       "file (--onnx), using the model's own eval preprocessing and class names. The default backend "
                       "is the fastest one installed.")
    add_source_args(p, onnx=True)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="inference backend (default: fastest installed; "
                   "the -int8 backends need an int8 .onnx from `mnv2 export --int8`)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--resolution", type=int, default=None, help="with --run / --weights: input size override")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..deploy.runtime import Predictor
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    options = {"backend": args.backend, "threads": args.threads, "batch_size": args.batch_size}
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
