"""Starting a run from weights people have: `model.init_weights` (any mnv2 weights file) and `model.freeze`.

A weights file is self-describing (mnv2.weights): it names its model, the keyword arguments that rebuild it and the
preprocessing it was trained with. A run started from it takes those as its defaults, layered between the recipe and
the user's flags: defaults <- recipe <- the file <- flags and --set. So `mnv2 train --init-weights FILE --data DIR`
trains the architecture the file holds on the inputs it expects, and anything the user sets wins (and is said so).

The weights are then loaded strictly (a mismatch names the key and both shapes); when the data has another class
count than the file, the file's classifier is loaded and replaced (`reset_classifier`), as timm users do it.
A classifier file given to a detector or segmentation model starts its backbone (`model.backbone_weights`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from .config import Config, load_config, merge

FREEZE = ("none", "backbone")
# Model arguments the run sets itself: the class count comes from the data, dropout from the recipe.
_RUN_ARGS = ("num_classes", "dropout")
_PREPROCESS = {"mean": "data.mean", "std": "data.std", "resolution": "data.resolution",
               "crop_fraction": "data.crop_fraction", "interpolation": "data.interpolation", "resize": "data.resize"}


def task_models(task: str) -> tuple[str, ...] | None:
    """The model names a detection / segmentation task trains (None for classification: any classifier)."""
    if task == "detection":
        from .tasks.detection import DETECTORS
        return DETECTORS
    if task == "segmentation":
        from .tasks.segmentation import SEGMENTERS
        return SEGMENTERS
    return None


def is_classifier_file(config: dict) -> bool:
    return config["model"] not in task_models("detection") + task_models("segmentation")


def settings_from_weights(path: str | Path, task: str) -> dict[str, object]:
    """The config values the weights file at `path` brings to a `task` run, keyed "section.key" ("model.kwargs.X"
    for a model argument): model, width and architecture arguments; for a classifier also its preprocessing. A
    classifier file for a detector or segmentation model brings only its width (it starts the backbone)."""
    from ..weights import read_config

    config = read_config(path)
    kwargs = config.get("model_kwargs", {})
    width = {"model.width": kwargs.get("width_mult", 1.0)}
    own = task_models(task)
    if own is not None and is_classifier_file(config):
        return width
    wrong_model = (not is_classifier_file(config)) if own is None else config["model"] not in own
    if wrong_model:
        raise UserError(f"{path}: holds a {config['model']!r}, which a {task} run cannot start from (a classifier "
                        f"file starts any task; a detector or segmentation model only its own task)")
    settings = {"model.name": config["model"], **width}
    settings |= {f"model.kwargs.{k}": v for k, v in kwargs.items() if k not in (*_RUN_ARGS, "width_mult")}
    if own is None:
        preprocess = config.get("preprocess") or {}
        settings |= {key: preprocess[field] for field, key in _PREPROCESS.items() if field in preprocess}
    return settings


def layered_config(recipe: str | Path | None, overrides: list[str]) -> tuple[Config, list[str]]:
    """The run's config: defaults <- recipe <- the `model.init_weights` file's settings <- `overrides` (flags and
    --set, "key=value"); and lines telling which settings came from the file and which of the user's replaced it."""
    cfg = load_config(recipe, overrides)
    path = cfg.model.init_weights
    if not path:
        return cfg, []
    settings = settings_from_weights(path, cfg.task)
    yours = {item.partition("=")[0].strip() for item in overrides}

    def set_by_user(key: str) -> bool:
        return any(key == y or key.startswith(y + ".") for y in yours)

    taken = {k: v for k, v in settings.items() if not set_by_user(k)}
    layer: dict = {}
    for key, value in taken.items():
        *parents, leaf = key.split(".")
        node = layer
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    base = merge(load_config(recipe), layer, source=str(path))
    cfg = load_config(None, overrides, base=base)
    notes = [f"from {path}: " + ", ".join(f"{k}={_show(v)}" for k, v in taken.items())]
    replaced = [f"{k}={_show(_lookup(cfg, k))} (file: {_show(v)})" for k, v in settings.items() if k not in taken]
    if replaced:
        notes.append("yours instead of the file's: " + ", ".join(replaced))
    return cfg, notes


def _lookup(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_init_weights(model: nn.Module, model_name: str, path: str | Path) -> str:
    """Load the weights file at `path` into `model` (registered as `model_name`), strictly; returns what was done.

    A file of another class count: its classifier is loaded, then replaced by a new one for the model's classes. A
    classifier file for a detector or segmentation model starts the backbone.
    """
    from ..weights import load_state_dict_strict, read_weights

    state, config = read_weights(path)
    if config["model"] != model_name and is_classifier_file(config) and hasattr(model, "load_backbone_state"):
        from .tasks import load_backbone_weights
        load_backbone_weights(model, path)
        return f"backbone started from {path}"
    wanted = model.num_classes
    had = config.get("model_kwargs", {}).get("num_classes", wanted)
    if had == wanted:
        load_state_dict_strict(model, state, source=str(path))
        return f"started from {path}"
    if not hasattr(model, "reset_classifier"):
        raise UserError(f"{path}: holds {had} classes, the data has {wanted}, and {type(model).__name__} cannot "
                        f"replace its classifier")
    model.reset_classifier(had)
    load_state_dict_strict(model, state, source=str(path))
    model.reset_classifier(wanted)
    return f"started from {path}; its classifier ({had} classes) replaced by a new one for {wanted}"


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """What `model.freeze=backbone` keeps fixed: a detector's or segmentation model's `backbone`, a classifier's
    everything but its `classifier`."""
    if hasattr(model, "backbone"):
        return [model.backbone]
    if hasattr(model, "classifier"):
        return [m for name, m in model.named_children() if name != "classifier"]
    raise UserError(f"model.freeze: {type(model).__name__} has no backbone to freeze")


def freeze(model: nn.Module) -> int:
    """Make the backbone untrainable (no gradients); returns how many parameters stay trainable. Its BatchNorm
    layers must also be kept in inference mode while training (`keep_frozen_bn_eval`), so their statistics hold."""
    for module in frozen_modules(model):
        module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keep_frozen_bn_eval(model: nn.Module) -> None:
    """After `model.train()`: the frozen part's BatchNorm layers back in inference mode (running statistics kept)."""
    for module in frozen_modules(model):
        module.apply(bn_to_eval)


def bn_to_eval(m: nn.Module) -> None:
    """`module.apply(bn_to_eval)`: its BatchNorm layers in inference mode (also `model.freeze_bn`)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.eval()
