"""The training fast path: memory allocator, channels_last and mixed precision, chosen for the hardware.

With glibc malloc, large activation buffers are mmapped and unmapped every training step, their pages faulted in
again each time. Preloading tcmalloc avoids that, so `mnv2 train` re-executes itself once with LD_PRELOAD when a
libtcmalloc is installed; otherwise glibc's own tunables keep freed buffers in the heap instead of returning them to
the kernel. BENCHMARKS.md "Training throughput" (benchmarks/train_throughput.py, 2-core AMD EPYC): with channels_last,
the tunables run 1.61x (1.0 @ 224) and 1.93x (0.35 @ 96) the plain glibc fp32 loop, tcmalloc 1.70x and 2.03x.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys

import torch

ENV_FLAG = "MNV2_ALLOCATOR"  # set once the allocator is arranged; "system" opts out of the re-exec
TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# glibc: never serve allocations with mmap (each big buffer would be mapped and faulted in again every step) and keep
# freed memory in the heap (no trimming); top_pad grows the heap in large steps.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.top_pad=268435456"


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc shared library (Debian/Ubuntu: libtcmalloc-minimal4), or None."""
    prefixes = [os.environ.get("CONDA_PREFIX", ""), sys.prefix]
    dirs = [os.path.join(p, "lib") for p in prefixes if p] + list(TCMALLOC_DIRS)
    for name in ("libtcmalloc_minimal.so*", "libtcmalloc.so*"):
        for d in dirs:
            hits = sorted(h for h in glob.glob(os.path.join(d, name)) if "debug" not in h)
            if hits:
                return hits[0]
    return None


def allocator_in_use() -> str:
    """'tcmalloc' if it is loaded in this process, 'glibc-tuned' if our tunables are set, else 'glibc'."""
    try:
        with open("/proc/self/maps") as f:
            if "tcmalloc" in f.read():
                return "tcmalloc"
    except OSError:
        pass
    return "glibc-tuned" if GLIBC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "") else "glibc"


def reexec_env(environ: dict) -> dict | None:
    """The environment to re-execute with for a fast allocator, or None if nothing would change."""
    if environ.get(ENV_FLAG) or not sys.platform.startswith("linux"):
        return None
    env = dict(environ)
    # OMP_WAIT_POLICY is left alone: PASSIVE helped only on a machine shared with other jobs and cost 5-20% of the
    # step rate on quiet cores (benchmarks/train_throughput.py, BENCHMARKS.md); users on shared hosts may set it.
    lib = find_tcmalloc()
    if lib:
        env["LD_PRELOAD"] = ":".join(p for p in (lib, environ.get("LD_PRELOAD", "")) if p)
        env[ENV_FLAG] = "tcmalloc"
    else:
        env["GLIBC_TUNABLES"] = ":".join(p for p in (environ.get("GLIBC_TUNABLES", ""), GLIBC_TUNABLES) if p)
        env[ENV_FLAG] = "glibc-tuned"
    return env


def maybe_reexec(argv: list[str]) -> None:
    """Replace this process by `python -m mnv2.cli.main ARGV` with the fast allocator's environment (once)."""
    env = reexec_env(dict(os.environ))
    if env is None or allocator_in_use() == "tcmalloc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mnv2.cli.main", *argv], env)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CPUs with native bf16 (AVX512-BF16 / AMX) and on GPUs that have it, else fp16 on GPU."""
    if mode == "fp32":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU: bf16 where the CPU computes it natively. With tcmalloc it used to gain nothing, because oneDNN's bf16 input
    # gradient of the four strided depthwise convs cost ~330 ms a step (1.0 @ 224, batch 32); `engine.bf16` runs that
    # gradient in fp32, and bf16 is then ~1.6x faster than fp32 (BENCHMARKS.md).
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if device.type == "cpu" and native_bf16:
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, active only for fp16 (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
