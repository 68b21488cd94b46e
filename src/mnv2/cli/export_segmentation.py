"""`mnv2 export` for segmentation models: the graph with its height and width free (or fixed by --resolution),
checked against PyTorch at two sizes; --int8 calibrates on images at the size the graph runs them at and, with
--val-data, measures the mIoU of fp32 and int8 as `mnv2 eval` does."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import UserError
from .export import _print


def run_segmenter(args, model, config: dict, out: Path, calib_images: list | None) -> int:
    """A segmentation model: the graph (H and W free, or fixed by --resolution), checked at two sizes; with --int8
    quantised on the --calib images (each at the size the graph runs it at: its own, or stretched to --resolution)
    and, with --val-data, mIoU of fp32 and of each installed int8 runtime on the val split."""
    import random

    from ..atomic import atomic_write_bytes
    from ..deploy.export_segmentation import export_segmenter
    if args.raw:
        raise UserError("--raw is for detectors; this model is a segmentation model")
    if args.val_data and not args.int8:
        raise UserError("--val-data measures the mIoU drop of --int8; use them together")
    dataset = None
    if args.val_data:  # a missing split or a class-count mismatch is one line before any work
        from ..deploy.quantize import segmentation_val_data
        dataset = segmentation_val_data(args.val_data)
        classes = getattr(model, "num_classes", dataset.num_classes)
        if classes != dataset.num_classes:
            raise UserError(f"--val-data {args.val_data}: the data has {dataset.num_classes} classes "
                            f"({', '.join(dataset.class_names[:4])}, ...) but the model predicts {classes}")
    if not args.int8:
        report = export_segmenter(model, config, out, args.resolution, args.opset)
        result = _segmenter_summary(report)
        _print(args, result, f"wrote {out} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}, input "
               f"{_input_size(report.resolution)}, {report.num_classes} classes); onnxruntime matches PyTorch to "
               f"{report.max_abs_diff:.2g} (logits up to {report.max_abs_logit:.3g}) at "
               + " and ".join(f"{h}x{w}" for _, h, w in report.checked_shapes))
        return 0
    if args.calib_images < 1:
        raise UserError(f"--calib-images must be at least 1, got {args.calib_images}")
    from ..deploy.quantize import PerImageCalibrationReader, quantize_int8, segmentation_miou, set_int8_info
    from ..deploy.runtime import is_installed
    from ..deploy.segment import SegmentationPredictor
    calib = list(calib_images)
    random.Random(0).shuffle(calib)
    calib = calib[:args.calib_images]
    with tempfile.TemporaryDirectory(prefix="mnv2-export-", dir=out.parent) as work:
        fp32, int8 = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        report = export_segmenter(model, config, fp32, args.resolution, args.opset)
        reference = SegmentationPredictor.from_onnx(fp32, backend="onnxruntime", threads=args.threads)
        quantize_int8(fp32, int8, PerImageCalibrationReader(calib, reference.preprocess), args.calib_method)
        info = {"method": args.calib_method, "calib_images": len(calib)}
        miou = {}
        if dataset is not None:
            predictors = {"fp32": reference}
            for name in ("onnxruntime-int8", "openvino-int8"):  # each int8 runtime rounds the same graph its own way
                if is_installed(name):
                    predictors[name] = SegmentationPredictor.from_onnx(int8, backend=name, threads=args.threads)
            miou = {name: {"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"]}
                    for name, m in segmentation_miou(predictors, dataset).items()}
            info.update(val_images=len(dataset), miou=miou)
        set_int8_info(int8, info)  # the measured mIoU travels with the file
        atomic_write_bytes(out, int8.read_bytes())  # only a quantised, measured model ever appears at --out
    drop = {name: miou["fp32"]["mIoU"] - m["mIoU"] for name, m in miou.items() if name != "fp32"}
    result = {**_segmenter_summary(report), "out": str(out), "method": args.calib_method,
              "calib_images": len(calib), "val_images": len(dataset) if dataset is not None else 0, "miou": miou,
              "miou_drop": drop, "size_bytes": out.stat().st_size}
    how = "at their own sizes" if report.resolution is None else f"stretched to {_input_size(report.resolution)}"
    line = (f"wrote {out} (int8 QDQ, {result['size_bytes'] / 1e6:.1f} MB, input {_input_size(report.resolution)}, "
            f"calibrated on {len(calib)} images {how}, {args.calib_method})")
    if miou:
        line += (f"; mIoU on {len(dataset)} val images: fp32 {miou['fp32']['mIoU']:.4f}, "
                 + ", ".join(f"{name} {m['mIoU']:.4f} (drop {drop[name]:.4f})" for name, m in miou.items()
                             if name != "fp32"))
    else:
        line += "; mIoU not measured (give --val-data DIR)"
    _print(args, result, line)
    return 0


def _input_size(resolution: int | None) -> str:
    return "N x 3 x H x W (any size)" if resolution is None else f"N x 3 x {resolution} x {resolution}"


def _segmenter_summary(report) -> dict:
    return {"out": str(report.path), "task": "segmentation", "resolution": report.resolution, "opset": report.opset,
            "dynamic_size": report.resolution is None, "checked_shapes": [list(s) for s in report.checked_shapes],
            "max_abs_diff": report.max_abs_diff, "max_abs_logit": report.max_abs_logit,
            "num_classes": report.num_classes, "size_bytes": report.size_bytes}
