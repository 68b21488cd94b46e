"""The resumable checkpoint `last.pt`: written atomically, read with `torch.load(weights_only=True)`.

Everything stored is a tensor, dict, list, number or string, so loading never runs pickled code. The RNG states of
python, numpy and torch and the position in the epoch's data order are stored too, so a run resumed after a kill
continues exactly as if it had not stopped.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import UserError

FORMAT = "mnv2-checkpoint-1"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save, written atomically (mnv2.atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, not a torch file, or pickled objects weights_only refuses)
        raise UserError(f"{path}: not a readable mnv2 checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an mnv2 training checkpoint (format {state.get('format')!r})"
                        if isinstance(state, dict) else f"{path}: not an mnv2 training checkpoint")
    return state


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors / plain values (weights_only-loadable)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": list(py_internal), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def scheduler_state(scheduler) -> dict:
    """LambdaLR's state without its lr_lambdas (rebuilt from the config; their attributes are not plain data)."""
    return {**{k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}, "lr_lambdas": [None]}
