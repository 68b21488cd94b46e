"""Model weight files: safetensors (never pickle) with the model's JSON config embedded in the header metadata.

A weights file is self-describing: `load_model(path)` rebuilds the model from the registry with the stored keyword
arguments, and returns the stored metadata (preprocessing, class names, provenance) beside it. A readable copy of the
config is written next to the weights as `<name>.json`. The header is the truth, and every reader here reads it; the
copy is removed before the weights are replaced and written again after them, so after a crash at any point a `.json`
beside a weights file describes those weights, or is absent until `restore_config_copy` (a resumed run) rewrites it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path, atomic_write_text, fsync_dir
from .errors import UserError
from .models import create_model

CONFIG_KEY = "mnv2_config"


def save_model(path: str | Path, model: nn.Module, model_name: str, model_kwargs: dict, **meta) -> Path:
    """Write `model`'s state dict to `path` (.safetensors) atomically, with its build config and `meta` (JSON-able:
    e.g. preprocess={"mean": ..., "std": ..., "resolution": ..., "crop_fraction": ..., "interpolation": ...},
    class_names=[...], source="torchvision")."""
    path = Path(path)
    config = {"model": model_name, "model_kwargs": model_kwargs, **meta}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = config_copy_path(path)
    if copy.exists():  # never the old weights' copy beside the new weights
        copy.unlink()
        fsync_dir(copy.parent)  # the removal is on disk before the new weights' rename is
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={CONFIG_KEY: json.dumps(config)})
    _write_config_copy(path, config)
    return path


def config_copy_path(path: str | Path) -> Path:
    """The readable copy of a weights file's config: `best.safetensors` -> `best.json`."""
    return Path(path).with_suffix(".json")


def _write_config_copy(path: Path, config: dict) -> None:
    atomic_write_text(config_copy_path(path), json.dumps(config, indent=2) + "\n")


def restore_config_copy(path: str | Path) -> bool:
    """Write the readable `.json` beside the weights file `path` from its header if it is missing or differs (a
    crash between the weights and their copy leaves none); True if it was written."""
    config, copy = read_config(path), config_copy_path(path)
    try:
        if json.loads(copy.read_text()) == config:
            return False
    except (OSError, ValueError):
        pass
    _write_config_copy(Path(path), config)
    return True


def read_config(path: str | Path) -> dict:
    """The config stored in a weights file, or a UserError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if CONFIG_KEY not in meta:
        raise UserError(f"{path}: safetensors file has no mnv2 model config (write it with `mnv2 convert` or a run)")
    try:
        return json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: model config is not valid JSON ({e})") from None


def read_weights(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, stored config) of an mnv2 weights file: the one reader behind `load_model`, `--init-weights` and
    `model.backbone_weights`."""
    config = read_config(path)  # a UserError naming the file if it is not an mnv2 weights file
    try:
        return load_file(str(path), device=map_location), config
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored in `path` and load its weights; returns (model in eval mode, config)."""
    state, config = read_weights(path, map_location)
    model = create_model(config["model"], **config.get("model_kwargs", {}))
    load_state_dict_strict(model, state, source=str(path))
    return model.eval(), config


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                           key_names: dict[str, str] | None = None) -> None:
    """`model.load_state_dict(state)` with one clear error naming the first key that does not fit.

    `key_names` maps the model's keys to the names the weights had before renaming (weight import), so that errors
    name the key the user can find in their file.
    """
    own = model.state_dict()
    for key, value in own.items():
        name = repr(key) if not key_names or key not in key_names else f"{key_names[key]!r} (our {key!r})"
        if key not in state:
            raise UserError(f"{source}: weights lack key {name} that the model needs (shape {tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: key {name} has shape {tuple(state[key].shape)} but the model expects "
                            f"{tuple(value.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"{source}: weights have key {extra[0]!r} that the model does not have")
    model.load_state_dict(state)
