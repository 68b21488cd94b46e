"""`mnv2 predict` for segmentation models: the classes present in each image with the fraction of its pixels they
cover; with --out, DIR/<name>.png (the class-index mask in VOC's palette) and DIR/<name>_overlay.jpg (the mask over
the image). Every image is read before anything runs or is written."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def run_segmentation(args, options: dict) -> int:
    from ..deploy.preprocess import load_image
    from ..deploy.segment import SegmentationPredictor, overlay, save_mask
    if args.resolution is not None and args.resolution < 16:
        raise UserError(f"--resolution must be at least 16, got {args.resolution}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder")
    images = [load_image(p) for p in args.images]  # an unreadable file is one line before any work or file
    if args.onnx:
        predictor = SegmentationPredictor.from_onnx(args.onnx, resolution=args.resolution, **options)
    elif args.run:
        predictor = SegmentationPredictor.from_run(args.run, resolution=args.resolution, **options)
    else:
        predictor = SegmentationPredictor.from_weights(args.weights, resolution=args.resolution, **options)
    masks = predictor.predict_images(images)
    written: dict[str, tuple[str, str]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        names: set[str] = set()
        for path, image, mask in zip(args.images, images, masks):
            name = Path(path).stem
            while name in names:  # two inputs with one name in different folders
                name += "_"
            names.add(name)
            written[path] = (str(save_mask(mask, out / f"{name}.png")),
                             str(overlay(image, mask, out / f"{name}_overlay.jpg")))
    shares = [predictor.class_shares(mask) for mask in masks]
    if args.json:
        print(json.dumps([{"image": str(path), "backend": predictor.backend_name, "size": list(mask.shape),
                           "classes": [s._asdict() for s in found],
                           "mask": written.get(path, (None, None))[0], "overlay": written.get(path, (None, None))[1]}
                          for path, mask, found in zip(args.images, masks, shares)], indent=2))
        return 0
    for path, mask, found in zip(args.images, masks, shares):
        listed = ", ".join(f"{s.name} {s.fraction:.3f}" for s in found)
        print(f"{path}: {mask.shape[1]}x{mask.shape[0]}: {listed}"
              + (f" -> {written[path][0]}, {written[path][1]}" if path in written else ""))
    return 0
