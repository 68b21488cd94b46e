"""The machine's fp32 compute floor: the best matrix-multiply rate its libraries reach on the bench's threads.

A dense fp32 network cannot run faster than its FLOPs (2 x MAdds) at this rate; the benches report how close each
runtime's network comes to it.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _best_gflops(run, n: int, repeats: int) -> float:
    """The best rate (GFLOP/s) of `run()`, one n x n x n product, over `repeats` timed calls after one warm-up."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """The best fp32 matrix-multiply rate of torch.mm on `threads` threads (GFLOP/s); 166-197 on 2 quiet cores of
    this machine, 90-98 on one."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    return _best_gflops(lambda: torch.mm(a, b), n, repeats)


def onnxruntime_matmul_gflops(threads: int, n: int = 2048, repeats: int = 8) -> float | None:
    """The best fp32 rate (GFLOP/s) of onnxruntime's MatMul (MLAS) on `threads` threads; None if not installed."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    spec = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [n, n]) for v in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return _best_gflops(lambda: session.run(None, feed), n, repeats)


def fp32_peaks(threads: int) -> dict[str, float]:
    """{library: best fp32 matrix-multiply GFLOP/s} on `threads` threads (torch.mm; onnxruntime's MatMul). A network's
    compute floor is its FLOPs over the best of them: on this CPU MKL's torch.mm reached ~190 GFLOP/s on 2 cores and
    onnxruntime's MLAS ~370-420, so torch.mm alone put the floor at twice its height."""
    peaks = {"torch.mm": matmul_gflops(threads)}
    mlas = onnxruntime_matmul_gflops(threads)
    if mlas is not None:
        peaks["onnxruntime MatMul"] = mlas
    torch.set_num_threads(threads)
    return peaks


def peaks_around(threads: int, work):
    """(work(), fp32_peaks) with each library's peak the better of before and after `work`: a peak, whatever phase a
    shared host is in while the benchmark runs."""
    peaks = fp32_peaks(threads)
    result = work()
    for library, rate in fp32_peaks(threads).items():
        peaks[library] = max(peaks.get(library, 0.0), rate)
    return result, peaks


def floor_line(result: dict) -> str:
    """The printed line of a bench result's compute floor: FLOPs over the best rate, every library's rate beside it."""
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["matmul_gflops"].items())
    return (f"compute floor of the network: {2 * result['madds'] / 1e9:.2f} GFLOP / "
            f"{max(result['matmul_gflops'].values()):.0f} GFLOP/s (best fp32 matmul, {result['threads']} threads, "
            f"this run: {peaks}) = {result['floor_ms']:.2f} ms")
