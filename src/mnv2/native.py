"""mnv2's native CPU kernels (`csrc/*.cpp`), compiled on first use for the machine they run on.

The t-split executor (`deploy/tsplit.py`) calls them through `torch.ops.mnv2_native`. They are built once per source,
torch version and CPU with the system C++ compiler (`g++`, or `$CXX`) against the installed torch's headers, with
`-march=native`, and cached under `$MNV2_CACHE_DIR` (default `~/.cache/mnv2`). Set `MNV2_NATIVE=0` to turn them off.
Where they cannot be built (no compiler, an unusual platform), `available()` is False, `status()` says why, and their
callers run PyTorch code that computes the same function, slower.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cpp"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20"]

_state: dict[str, object] = {}


def _cpu_flags() -> str:
    """The CPU's feature flags: part of the cache key, so that a shared cache never hands a binary to a CPU it cannot
    run on."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("MNV2_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mnv2")
    return Path(root) / "native"


def _command(compiler: str, out: Path) -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", *map(str, SOURCES), "-o", str(out),
            f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"]


def _build() -> Path:
    """The compiled library for this source / torch / CPU, built now if the cache does not have it."""
    try:  # POSIX only: imported here so that `import mnv2.deploy` works where it is absent (Windows)
        import fcntl
    except ImportError:
        raise RuntimeError("no fcntl module to lock the build cache (not a POSIX system)") from None
    compiler = os.environ.get("CXX", "g++")
    parts = [*(p.read_bytes() for p in SOURCES), torch.__version__, " ".join(FLAGS), compiler, platform.machine(),
             _cpu_flags()]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts))
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"mnv2_native-{key.hexdigest()[:16]}.so"
    with open(cache / (lib.name + ".lock"), "w") as lock:  # one builder at a time (e.g. pytest-xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            if shutil.which(compiler) is None:
                raise RuntimeError(f"no C++ compiler {compiler!r} on PATH to build mnv2's native kernels")
            # said on stderr: the first torch-fast / t-split call otherwise sits silent for ~15-40 s
            print("mnv2: compiling native kernels for this CPU (once, about 15-40 s)", file=sys.stderr, flush=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
            os.close(fd)
            try:
                done = subprocess.run(_command(compiler, Path(tmp)), capture_output=True, text=True, timeout=600,
                                      check=False)
                if done.returncode != 0:
                    first_error = next((line for line in done.stderr.splitlines() if "error" in line),
                                       done.stderr.strip()[-300:])
                    raise RuntimeError(f"{compiler} failed on mnv2's native kernels: {first_error}")
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return lib


def available() -> bool:
    """True when the native kernels are loaded (built first if needed); False, with `status()` saying why, otherwise."""
    if "ok" not in _state:
        if os.environ.get("MNV2_NATIVE", "1") == "0":
            _state.update(ok=False, why="turned off by MNV2_NATIVE=0")
        elif platform.system() != "Linux":
            _state.update(ok=False, why=f"built on Linux only (this is {platform.system()})")
        else:
            try:
                torch.ops.load_library(str(_build()))
                _state.update(ok=True, why="native")
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _state.update(ok=False, why=str(e))
    return bool(_state["ok"])


def status() -> str:
    """'native' when the kernels are in use, else the reason they are not."""
    available()
    return str(_state["why"])
