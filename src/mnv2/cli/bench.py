"""`mnv2 bench`: inference latency / throughput per backend, or measured peak activation memory (--memory)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput per backend, or peak memory (--memory), beside "
                       "torchvision's eager mobilenet_v2 (a detector: its ssdlite320_mobilenet_v3_large; a "
                       "segmentation model: its lraspp / deeplabv3_mobilenet_v3_large) in the same run",
                       description="Benchmark inference. Default: median / p90 latency at batch 1 and images/s at "
                       "--batch for each backend. A detector (--model ssdlite_mobilenet_v2): end-to-end latency at "
                       "batch 1 from a 640x480 image to boxes (preprocessing, network, decode + NMS) per backend, "
                       "beside torchvision's SSDLite, and each fp32 network alone against the compute floor. "
                       "A segmentation model (--model deeplabv3_mobilenet_v2): end-to-end latency at batch 1 from a "
                       "preprocessed 512x512 input to the per-pixel class map per backend, beside torchvision's "
                       "lraspp and deeplabv3_mobilenet_v3_large, and each network alone against the compute floor. "
                       "--memory: measured peak activation memory and latency of the section 5.1 t-split executor "
                       "(mobilenet_v2: t = 1..6 at 224 and 1024; deeplabv3_mobilenet_v2: up to the logits at the "
                       "output stride, t = 1, 2, 4, 8, 16 at 512 and 1024, beside torchvision's two segmenters).")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="benchmark this .safetensors model instead of random weights (latency mode)")
    p.add_argument("--resolution", type=int, default=None,
                   help="input side (default 224; a detector: 320; a segmentation model: 512)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput run (default 32)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: every one installed)")
    p.add_argument("--memory", action="store_true", help="measure peak activation memory of the t-split executor")
    p.add_argument("--splits", default=None,
                   help="with --memory: the t values (default 1..6; a segmentation model: 1,2,4,8,16)")
    p.add_argument("--resolutions", default=None,
                   help="with --memory: comma-separated input sizes (default 224,1024; a segmentation model: "
                   "512,1024)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="a detector: our deployment score threshold (default 0.01)")
    p.add_argument("--nms-boxes", type=int, default=None,
                   help="a detector with random weights: boxes entering NMS per image, for both detectors "
                   "(default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.memory:
        from ..bench.memory import main as memory_main
        return memory_main(args)
    from ..engine.tasks.detection import DETECTORS
    model = args.model
    if args.weights:
        from ..weights import read_config
        model = read_config(args.weights)["model"]
    if model in DETECTORS:
        from ..bench import detection
        args.resolution = 320 if args.resolution is None else args.resolution
        args.score_threshold = detection.DEPLOY_THRESHOLD if args.score_threshold is None else args.score_threshold
        args.nms_boxes = detection.NMS_BOXES if args.nms_boxes is None else args.nms_boxes
        return detection.main(args)
    from ..engine.tasks.segmentation import SEGMENTERS
    if model in SEGMENTERS:
        from ..bench import segmentation
        args.resolution = segmentation.RESOLUTION if args.resolution is None else args.resolution
        return segmentation.main(args)
    args.resolution = 224 if args.resolution is None else args.resolution
    from ..bench.latency import main as latency_main
    return latency_main(args)
