"""`mnv2 bench`: inference latency / throughput per backend, or measured peak activation memory (--memory)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput per backend, or peak memory (--memory), beside "
                       "torchvision's eager mobilenet_v2 in the same run",
                       description="Benchmark inference. Default: median / p90 latency at batch 1 and images/s at "
                       "--batch for each backend. --memory: measured peak activation memory and latency of the "
                       "section 5.1 t-split executor for t = 1..6.")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="benchmark this .safetensors model instead of random weights (latency mode)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput run (default 32)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: every one installed)")
    p.add_argument("--memory", action="store_true", help="measure peak activation memory of the t-split executor")
    p.add_argument("--splits", default="1,2,3,4,5,6", help="with --memory: the t values (default 1..6)")
    p.add_argument("--resolutions", default=None, help="with --memory: comma-separated input sizes (default 224,1024)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.memory:
        from ..bench.memory import main as memory_main
        return memory_main(args)
    from ..bench.latency import main as latency_main
    return latency_main(args)
