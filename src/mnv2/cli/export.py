"""`mnv2 export`: a model to one self-contained ONNX file (BN folded, checked against PyTorch), optionally int8.
Detectors continue in cli/export_detection.py, segmentation models in cli/export_segmentation.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import UserError


def add_source_args(p, onnx: bool = False) -> None:
    """--run / --weights / --model (and --onnx for commands that can run an exported file): exactly one."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--run", metavar="RUN_DIR", help="a training run directory (uses its best.safetensors)")
    group.add_argument("--weights", metavar="FILE", help="a .safetensors weights file written by mnv2")
    if onnx:
        group.add_argument("--onnx", metavar="FILE", help="an .onnx file written by `mnv2 export`")
    else:
        group.add_argument("--model", metavar="NAME", help="a registered model with random weights (for benchmarks)")
        p.add_argument("--width", type=float, default=1.0, help="with --model: width multiplier (default 1.0)")
        p.add_argument("--num-classes", type=int, default=1000, help="with --model: classes (default 1000)")


def register(sub) -> None:
    from ..choices import CALIBRATION_METHODS, DEFAULT_METHOD, DEFAULT_OPSET, MIN_OPSET
    p = sub.add_parser("export", help="export a classifier, detector or segmentation model to ONNX (BN folded, "
                       "verified), optionally int8",
                       description="Export a classifier to one .onnx file with BN folded into the convolutions. The "
                       "graph is run with onnxruntime and compared with PyTorch (max |difference| <= 1e-4) before the "
                       "file is written; preprocessing and class names are stored in its metadata. --int8 writes a "
                       "statically quantised model (QDQ, per-channel weights) calibrated on images from --calib and "
                       "reports its top-1 agreement with the fp32 model on held-out images from the same folder. A "
                       "detector's graph also decodes the boxes and runs per-class NMS (outputs boxes, scores, labels, "
                       "count; --raw: the two heads only); its --int8 quantises the network, keeps NMS fp32 and, with "
                       "--val-data, reports COCO AP of fp32 and int8. A segmentation model's graph takes images of any "
                       "size ([N, 3, H, W] -> logits [N, C, H, W]; --resolution fixes H = W), is checked at two sizes, "
                       "calibrates on the --calib images at their own sizes and, with --val-data, reports mIoU of "
                       "fp32 and int8.")
    add_source_args(p)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="output format (onnx)")
    p.add_argument("--resolution", type=int, default=None,
                   help="input size (default: the model's own, else 224); segmentation: fix the graph's height and "
                   "width to this square size, images then stretched to it (default: any size)")
    p.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension free (default: batch 1; a "
                   "segmentation graph's batch is always free)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="output file (written atomically)")
    p.add_argument("--int8", action="store_true", help="write an int8 model (needs --calib)")
    p.add_argument("--calib", metavar="DIR", help="with --int8: a folder of images (searched recursively)")
    p.add_argument("--calib-images", type=int, default=200, metavar="N",
                   help="with --int8: at most N images calibrate, never more than half; the rest measure agreement "
                   "(default 200)")
    p.add_argument("--agreement-images", type=int, default=500, metavar="N",
                   help="with --int8, a classifier: at most N of the other images (a seeded random sample) measure "
                   "top-1 agreement with fp32 (default 500)")
    p.add_argument("--calib-method", choices=CALIBRATION_METHODS, default=DEFAULT_METHOD,
                   help=f"with --int8: activation range calibration (default {DEFAULT_METHOD})")
    p.add_argument("--raw", action="store_true", help="detector: export the network's two heads only (class "
                   "logits, box deltas), without decoding and NMS in the graph")
    p.add_argument("--val-data", metavar="DIR", help="with --int8: a detector's COCO-layout folder whose val split "
                   "measures COCO AP of the fp32 and int8 graphs; a segmentation model's VOC-layout folder whose val "
                   "split measures mIoU as `mnv2 eval` does")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for checking and calibration")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..deploy.export import export_onnx, load_source
    if args.int8 and not args.calib:
        raise UserError("--int8 needs --calib DIR (images to calibrate on)")
    if args.calib and not args.int8:
        raise UserError("--calib is only used with --int8")
    if args.agreement_images < 1:
        raise UserError(f"--agreement-images must be at least 1, got {args.agreement_images}")
    if args.resolution is not None and args.resolution < 32:
        raise UserError(f"--resolution must be at least 32, got {args.resolution}")
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UserError(f"{out}: --out must end in .onnx")
    if not out.parent.is_dir():
        raise UserError(f"{out}: output directory {out.parent} does not exist")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    calib = None
    if args.int8:  # check the images before spending time on the export
        from ..deploy.preprocess import list_images
        calib = list_images(args.calib)
    if args.model is not None:
        from ..engine.tasks.detection import DETECTORS
        from ..engine.tasks.segmentation import SEGMENTERS
        if args.model in DETECTORS:  # its class names, input size and NMS settings come with trained weights
            raise UserError(f"--model {args.model}: a detector is exported from a run or weights file (--run / "
                            "--weights), which carry its classes, input size and post-processing")
        if args.model in SEGMENTERS:
            raise UserError(f"--model {args.model}: a segmentation model is exported from a run or weights file "
                            "(--run / --weights), which carry its classes and normalisation")
    model, config = load_source(args.run, args.weights, args.model, args.width, args.num_classes)
    if config.get("task") == "detection":
        from .export_detection import run_detector
        return run_detector(args, model, config, out, calib)
    if config.get("task") == "segmentation":
        from .export_segmentation import run_segmenter
        return run_segmenter(args, model, config, out, calib)
    if args.raw or args.val_data:
        raise UserError(f"{'--raw' if args.raw else '--val-data'} is for detectors and segmentation models; this "
                        "model is a classifier")
    if not args.int8:
        report = export_onnx(model, config, out, args.resolution, args.dynamic_batch, args.opset)
        result = {"out": str(out), "resolution": report.resolution, "opset": report.opset,
                  "dynamic_batch": report.dynamic_batch, "max_abs_diff": report.max_abs_diff,
                  "max_abs_logit": report.max_abs_logit, "size_bytes": report.size_bytes}
        _print(args, result, f"wrote {out} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}, "
               f"{report.resolution}x{report.resolution}, batch {'dynamic' if report.dynamic_batch else 1}); "
               f"onnxruntime matches PyTorch to {report.max_abs_diff:.2g} (logits up to {report.max_abs_logit:.3g})")
        return 0
    with tempfile.TemporaryDirectory(prefix="mnv2-export-", dir=out.parent) as work:
        fp32 = Path(work) / "fp32.onnx"
        report = export_onnx(model, config, fp32, args.resolution, args.dynamic_batch, args.opset)
        int8 = Path(work) / "int8.onnx"
        result = _int8(args, fp32, int8, calib)
        from ..atomic import atomic_write_bytes
        atomic_write_bytes(out, int8.read_bytes())  # only a quantised, measured model ever appears at --out
    result["out"] = str(out)
    result.update({"resolution": report.resolution, "opset": report.opset, "fp32_max_abs_diff": report.max_abs_diff})
    agreements = ", ".join(f"{a * 100:.2f}% on {name}" for name, a in result["agreement_by_backend"].items())
    _print(args, result, f"wrote {out} (int8 QDQ, {result['size_bytes'] / 1e6:.1f} MB, calibrated on "
           f"{result['calib_images']} images, {result['method']}); top-1 agreement with fp32: {agreements} "
           f"({result['heldout_images']} held-out images)")
    return 0


def _int8(args, fp32: Path, int8: Path, images: list) -> dict:
    from ..deploy.export import META_PREPROCESS
    from ..deploy.preprocess import Preprocess
    from ..deploy.quantize import CalibrationReader, quantize_int8, set_int8_info, split_calibration, top1_agreement
    from ..deploy.runtime import OnnxRuntimeBackend, OpenVinoBackend, inspect_onnx, is_installed
    from ..progress import progress_bar
    calib, heldout = split_calibration(images, args.calib_images, heldout_images=args.agreement_images)
    preprocess = Preprocess.from_dict(inspect_onnx(fp32)[1][META_PREPROCESS])
    calibrating = progress_bar(calib, desc="int8 calibration", enabled=not args.json)
    quantize_int8(fp32, int8, CalibrationReader.from_images(calibrating, preprocess), args.calib_method)
    fp32_run = OnnxRuntimeBackend(fp32, args.threads)
    # Each installed int8 runtime computes its own rounding of the same QDQ graph: measure each one.
    int8_runs = {"onnxruntime-int8": OnnxRuntimeBackend(int8, args.threads)}
    if is_installed("openvino-int8"):
        int8_runs["openvino-int8"] = OpenVinoBackend(int8, args.threads)
    batch = 16 if args.dynamic_batch else 1
    by_backend = {name: top1_agreement(fp32_run, run, heldout, preprocess, batch_size=batch, progress=not args.json,
                                       desc=f"top-1 agreement, {name}").fraction
                  for name, run in int8_runs.items()}
    info = {"method": args.calib_method, "calib_images": len(calib), "heldout_images": len(heldout),
            "top1_agreement": by_backend["onnxruntime-int8"], "top1_agreement_by_backend": by_backend}
    set_int8_info(int8, info)  # the measured agreement travels with the file
    return {"method": args.calib_method, "calib_images": len(calib), "heldout_images": len(heldout),
            "agreement": by_backend["onnxruntime-int8"], "agreement_by_backend": by_backend,
            "size_bytes": int8.stat().st_size}


def _print(args, result: dict, line: str) -> None:
    print(json.dumps(result, indent=2) if args.json else line)
