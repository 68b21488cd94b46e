"""`mnv2 export` for detectors: decode + NMS in the graph (or --raw heads), checked against PyTorch; --int8 quantises
the network, keeps NMS fp32 and with --val-data reports COCO AP of fp32 and int8 on the val split."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from ..errors import UserError


def run_detector(args, model, config: dict, out: Path, calib_images: list | None) -> int:
    from ..deploy.export_detection import export_detector
    if args.resolution is not None:
        raise UserError("--resolution: a detector is exported at the input size it was trained at")
    if args.val_data and not args.int8:
        raise UserError("--val-data measures the AP drop of --int8; use them together")
    if args.val_data:  # a missing split is one line before any work
        from ..data.coco import find_coco_split
        find_coco_split(args.val_data, "val")
    if not args.int8:
        report = export_detector(model, config, out, args.dynamic_batch, args.opset, args.raw)
        _print(args, _summary(report), f"wrote {out} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}, "
               f"{report.resolution}x{report.resolution}, batch {'dynamic' if report.dynamic_batch else 1}, "
               f"{'raw heads' if report.raw else 'decode + NMS in the graph'}, uint8 pixels in); onnxruntime matches "
               f"PyTorch: normalisation to {report.check.max_pixel_diff:.2g}, heads to "
               f"{report.check.max_abs_diff:.2g}" + ("" if report.raw else
               f", {report.check.detections} probe detections (boxes to {report.check.max_box_diff:.2g}, "
               f"scores to {report.check.max_score_diff:.2g})"))
        return 0
    with tempfile.TemporaryDirectory(prefix="mnv2-export-", dir=out.parent) as work:
        fp32, int8 = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        report = export_detector(model, config, fp32, args.dynamic_batch, args.opset, args.raw)
        result = _int8(args, fp32, int8, calib_images)
        from ..atomic import atomic_write_bytes
        atomic_write_bytes(out, int8.read_bytes())  # only a quantised, measured model ever appears at --out
    result = {**_summary(report), **result, "out": str(out)}  # the check is the fp32 graph's, the size the int8's
    line = (f"wrote {out} (int8 QDQ network, {'raw heads' if args.raw else 'decode + NMS in fp32'}, "
            f"{result['size_bytes'] / 1e6:.1f} MB, calibrated on {result['calib_images']} images, {result['method']})")
    if result["ap"]:
        fp, parts = result["ap"]["fp32"], []
        for name, m in result["ap"].items():
            if name != "fp32":
                parts.append(f"{name} AP {m['AP']:.3f} AP50 {m['AP50']:.3f} (drop {fp['AP'] - m['AP']:.3f} / "
                             f"{fp['AP50'] - m['AP50']:.3f})")
        line += (f"; COCO on {result['val_images']} val images: fp32 AP {fp['AP']:.3f} AP50 {fp['AP50']:.3f}, "
                 + ", ".join(parts))
    else:
        line += "; AP not measured (give --val-data DIR)"
    _print(args, result, line)
    return 0


def _int8(args, fp32: Path, int8: Path, images: list) -> dict:
    from ..deploy.detect import DetectionPredictor
    from ..deploy.quantize import CalibrationReader, detection_ap, quantize_int8, set_int8_info
    from ..deploy.runtime import is_installed
    if args.calib_images < 1:
        raise UserError(f"--calib-images must be at least 1, got {args.calib_images}")
    calib = list(images)
    random.Random(0).shuffle(calib)
    calib = calib[:args.calib_images]
    reference = DetectionPredictor.from_onnx(fp32, backend="onnxruntime", threads=args.threads)
    quantize_int8(fp32, int8, CalibrationReader.from_images(calib, reference.preprocess), args.calib_method)
    info = {"method": args.calib_method, "calib_images": len(calib)}
    ap, val_images = {}, 0
    if args.val_data:
        predictors = {"fp32": reference}
        for name in ("onnxruntime-int8", "openvino-int8"):  # each int8 runtime rounds the same graph its own way
            if is_installed(name):
                predictors[name] = DetectionPredictor.from_onnx(int8, backend=name, threads=args.threads)
        ap, val_images = detection_ap(predictors, args.val_data)
        ap = {name: {k: m[k] for k in ("AP", "AP50", "AP75")} for name, m in ap.items()}
        info.update(val_images=val_images, ap=ap)
    set_int8_info(int8, info)  # the measured AP travels with the file
    drop = {name: {k: ap["fp32"][k] - m[k] for k in ("AP", "AP50")} for name, m in ap.items() if name != "fp32"}
    return {"method": args.calib_method, "calib_images": len(calib), "val_images": val_images, "ap": ap,
            "ap_drop": drop, "size_bytes": int8.stat().st_size}


def _summary(report) -> dict:
    c = report.check
    return {"out": str(report.path), "resolution": report.resolution, "opset": report.opset,
            "dynamic_batch": report.dynamic_batch, "raw": report.raw, "size_bytes": report.size_bytes,
            "max_abs_diff": c.max_abs_diff, "max_abs_output": c.max_abs_output, "max_pixel_diff": c.max_pixel_diff,
            "max_box_diff": c.max_box_diff,
            "max_score_diff": c.max_score_diff, "probe_detections": c.detections}


def _print(args, result: dict, line: str) -> None:
    print(json.dumps(result, indent=2) if args.json else line)
