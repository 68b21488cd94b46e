"""Typed training configuration: dataclasses, with YAML recipes (configs/*.yaml) and `--set key.sub=value` on top.

A recipe only names what differs from these defaults. Every key is checked against the dataclasses, so a typo in a
recipe or an override is one clear error naming the key, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError


@dataclass
class ModelConfig:
    name: str = "mobilenet_v2"
    width: float = 1.0
    dropout: float = 0.2
    kwargs: dict = field(default_factory=dict)  # further create_model() arguments (padding, bn_eps, bn_momentum, ...)
    freeze_bn: bool = False  # BN in inference mode while training (fine-tuning; makes every sample independent)
    sync_bn: bool = False  # SyncBatchNorm under DDP (GPU only in PyTorch)
    backbone_weights: str | None = None  # detector / segmenter: start the backbone from a classifier weights file
    init_weights: str | None = None  # start from any mnv2 weights file (fine-tuning; engine/finetune.py)
    freeze: str = "none"  # none | backbone (train only the classifier / the task's head: a linear probe)


@dataclass
class DataConfig:
    root: str | None = None  # an ImageFolder with train/ and val/; None = the embedded "shapes" dataset
    train_split: str = "train"
    val_split: str = "val"
    resolution: int = 224  # training crop
    eval_resolution: int | None = None  # None = resolution
    crop_fraction: float = 0.875  # eval: resize to resolution / crop_fraction, centre crop (PAPER.md section 5)
    resize: str = "crop"  # eval: "crop" (short side, centre crop) | "squash" (whole image, aspect not kept: Keras)
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None  # "trivialaugment" = TrivialAugmentWide (torchvision V2 recipe)
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    num_workers: int = 2
    on_bad_image: str = "error"  # "error" stops naming the file; "skip" goes on and reports at the end
    # Detection: COCO-format files anywhere (default: root's COCO 2017 layout, or the embedded shapes layout).
    # Segmentation: a folder of images and one of index-PNG masks paired by file stem, optionally listed in a file.
    train_images: str | None = None
    train_annotations: str | None = None
    train_list: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    val_list: str | None = None
    # Detection: SSD augmentation (random IoU crop, zoom-out up to this factor, photometric distortion) + hflip.
    iou_crop: bool = True
    zoom_out: float = 4.0  # 1.0 = off
    photometric: bool = True
    rot90: bool = False  # a random multiple of 90 degrees: only for rotation-invariant classes (the shapes)
    # Segmentation: random rescale of the whole image by a factor in this range, then pad + crop to `resolution`.
    rescale: tuple[float, float] = (0.5, 2.0)


@dataclass
class DetectionConfig:
    loss: str = "sigmoid"  # sigmoid (TF SSDLite) | softmax (torchvision)
    neg_pos_ratio: float = 3.0  # hard negative mining: negatives kept per positive
    min_negatives: int = 3  # per image, also when it has no positives (TF's min_negatives_per_image)
    match_iou: float = 0.5  # anchor <-> ground truth IoU for a positive
    score_threshold: float = 1e-8  # evaluation keeps (almost) every score: COCOeval takes the top 100 (PAPER.md 8)
    nms_iou: float = 0.6
    max_detections: int = 100


@dataclass
class OptimConfig:
    name: str = "rmsprop_tf"  # rmsprop_tf | sgd | adamw
    lr: float | None = None  # None = the optimiser's own default (OPTIMIZER_DEFAULTS)
    momentum: float = 0.9
    nesterov: bool = False
    decay: float = 0.9  # RMSProp's mean-square decay (TF's `decay` / `rho`)
    eps: float | None = None  # RMSProp: inside the square root (TF, default 1.0); AdamW: torch's (1e-8)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 4e-5
    # Which parameters weight decay reaches: all | no_norm_bias (not BN parameters nor biases) | tf_slim (only the
    # kernels of regular convs and fully-connected layers: TF-Slim's MobileNet training scope, PAPER.md section 5)
    decay_scope: str = "all"
    grad_clip: float = 0.0  # max global gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    name: str = "exponential"  # exponential | cosine | poly | constant
    power: float = 0.9  # poly: lr * (1 - step / total) ** power (DeepLab)
    gamma: float = 0.98  # exponential: lr *= gamma every `decay_epochs` epochs (paper section 5)
    decay_epochs: float = 1.0
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start * lr
    warmup_start: float = 0.01
    min_lr: float = 0.0  # cosine floor, as a fraction of lr


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 96  # per process (the paper: 96 per GPU worker)
    label_smoothing: float = 0.0  # classifiers, and segmentation per pixel; a detector refuses it (validate)
    ema_decay: float = 0.0  # 0 = no EMA; TF-Slim used 0.9999 (per step)
    ema_warmup: bool = False  # TF's num_updates warm-up: the n-th update's decay is min(ema_decay, (1+n)/(10+n))
    seed: int = 0
    deterministic: bool = True
    amp: str = "auto"  # auto | bf16 | fp16 | fp32
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 50  # also write last.pt every N optimizer steps (0 = only at epoch ends)
    eval_every: int = 1  # epochs
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); for smoke tests
    threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class Config:
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: Config | None = None) -> Config:
    """`base` (default: the dataclass defaults), then the YAML recipe at `path`, then `key.sub=value` overrides
    (values parsed as YAML)."""
    cfg = base if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
        cfg = merge(cfg, data, source=str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.sub=value")
        nested: dict = {}
        node = nested
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else None
        cfg = merge(cfg, nested, source="--set")
    return validate(with_optimizer_defaults(cfg))


def config_from_dict(data: dict, source: str) -> Config:
    """A Config from its saved dict form (config.yaml of a run, or a checkpoint)."""
    return validate(with_optimizer_defaults(merge(Config(), data, source=source)), source)


# What an unset optim.lr / optim.eps means for each optimiser: the paper's RMSProp (lr 0.045, TF's eps 1.0 inside the
# square root), torchvision's MobileNetV2 SGD recipe (lr 0.045), PyTorch's AdamW (lr 1e-3, eps 1e-8). One optimiser's
# eps 1.0 would stall another's updates, so no value is shared.
OPTIMIZER_DEFAULTS = {"rmsprop_tf": {"lr": 0.045, "eps": 1.0}, "sgd": {"lr": 0.045, "eps": 1e-8},
                      "adamw": {"lr": 1e-3, "eps": 1e-8}}


def optimizer_defaults(optim: OptimConfig) -> OptimConfig:
    """`optim` with lr / eps, where unset, taken from the chosen optimiser's defaults (an unknown name is left for
    `validate` to name)."""
    defaults = OPTIMIZER_DEFAULTS.get(optim.name, {})
    filled = {k: v for k, v in defaults.items() if getattr(optim, k) is None}
    return dataclasses.replace(optim, **filled) if filled else optim


def with_optimizer_defaults(cfg: Config) -> Config:
    return dataclasses.replace(cfg, optim=optimizer_defaults(cfg.optim))


# Allowed values, checked once the recipe, the flags and the --set overrides are merged: (key, choices) or
# (key, low, high, low_open, high_open); None bounds are open-ended. A bad value is one error naming the key.
CHOICES = {
    "task": ("classification", "detection", "segmentation"),
    "model.freeze": ("none", "backbone"),
    "data.interpolation": ("bilinear", "bicubic", "nearest"),
    "data.resize": ("crop", "squash"),
    "data.on_bad_image": ("error", "skip"),
    "data.auto_augment": (None, "trivialaugment"),
    "detection.loss": ("sigmoid", "softmax"),
    "optim.name": ("rmsprop_tf", "sgd", "adamw"),
    "optim.decay_scope": ("all", "no_norm_bias", "tf_slim"),
    "schedule.name": ("exponential", "cosine", "poly", "constant"),
    "train.amp": ("auto", "bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
}
RANGES = {  # key: (low, high, low inclusive, high inclusive)
    "model.width": (0, None, False, False),
    "model.dropout": (0, 1, True, False),
    "data.resolution": (16, None, True, False),
    "data.eval_resolution": (16, None, True, False),
    "data.crop_fraction": (0, 1, False, True),
    "data.scale": (0, 1, False, True),
    "data.hflip": (0, 1, True, True),
    "data.color_jitter": (0, None, True, False),
    "data.random_erasing": (0, 1, True, True),
    "data.mixup_alpha": (0, None, True, False),
    "data.cutmix_alpha": (0, None, True, False),
    "data.std": (0, None, False, False),
    "data.num_workers": (0, None, True, False),
    "data.zoom_out": (1, None, True, False),
    "data.rescale": (0, None, False, False),
    "detection.neg_pos_ratio": (0, None, False, False),
    "detection.min_negatives": (0, None, True, False),
    "detection.match_iou": (0, 1, False, True),
    "detection.score_threshold": (0, 1, True, False),
    "detection.nms_iou": (0, 1, False, True),
    "detection.max_detections": (1, None, True, False),
    "optim.lr": (0, None, False, False),
    "optim.momentum": (0, 1, True, False),
    "optim.decay": (0, 1, False, False),
    "optim.eps": (0, None, False, False),
    "optim.betas": (0, 1, True, False),
    "optim.weight_decay": (0, None, True, False),
    "optim.grad_clip": (0, None, True, False),
    "schedule.power": (0, None, False, False),
    "schedule.gamma": (0, 1, False, True),
    "schedule.decay_epochs": (0, None, False, False),
    "schedule.warmup_epochs": (0, None, True, False),
    "schedule.warmup_start": (0, 1, True, True),
    "schedule.min_lr": (0, 1, True, True),
    "train.epochs": (1, None, True, False),
    "train.batch_size": (1, None, True, False),
    "train.label_smoothing": (0, 1, True, False),
    "train.ema_decay": (0, 1, True, False),
    "train.checkpoint_every": (0, None, True, False),
    "train.eval_every": (1, None, True, False),
    "train.max_steps": (0, None, True, False),
    "train.threads": (0, None, True, False),
}
ORDERED = ("data.scale", "data.rescale")  # pairs (low, high): low <= high


def validate(cfg: Config, source: str | None = None) -> Config:
    """`cfg` if every value is one its key allows (CHOICES, RANGES), else a UserError naming the key, the value and
    what is allowed."""
    where = f"{source}: " if source else ""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            allowed = ", ".join("null" if c is None else str(c) for c in choices)
            raise UserError(f"{where}config key {key!r} is {value!r}; choose one of {allowed}")
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = _get(cfg, key)
        for v in (value if isinstance(value, tuple) else (value,)):
            if v is None:
                continue
            bad_low = low is not None and (v < low if low_in else v <= low)
            bad_high = high is not None and (v > high if high_in else v >= high)
            if bad_low or bad_high:
                lo = "" if low is None else f"{'>=' if low_in else '>'} {low:g}"
                hi = "" if high is None else f"{'<=' if high_in else '<'} {high:g}"
                raise UserError(f"{where}config key {key!r} is {value!r}; it must be "
                                f"{' and '.join(b for b in (lo, hi) if b)}")
    for key in ORDERED:
        low, high = _get(cfg, key)
        if low > high:
            raise UserError(f"{where}config key {key!r} is {[low, high]}: the first value must not exceed the second")
    if cfg.task == "detection" and cfg.train.label_smoothing:  # rather than a setting silently without effect
        raise UserError(f"{where}config key 'train.label_smoothing' is {cfg.train.label_smoothing!r}: the detection "
                        "loss (multibox) does not smooth labels; leave it at 0")
    return cfg


def _get(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def merge(obj, data: dict, source: str, prefix: str = ""):
    """A copy of dataclass `obj` with the values of `data` applied, type-checked; unknown keys are a UserError."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if name in RENAMED:
            key, value = _renamed(name, value, data, source)
            name = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"{source}: unknown config key {name!r} (known: {', '.join(sorted(fields))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, source, prefix=f"{name}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # a mapping (model.kwargs) is updated, not replaced
            changes[key] = {**current, **_coerce(value, hints[key], name, source)}
        else:
            changes[key] = _coerce(value, hints[key], name, source)
    return dataclasses.replace(obj, **changes)


# Keys of older recipes and saved runs (config.yaml, checkpoints), read as the key that replaced them:
# old key -> (new key in the same section, {old value: new value}).
RENAMED = {"optim.no_decay_norm_bias": ("decay_scope", {True: "no_norm_bias", False: "all"})}


def _renamed(name: str, value, data: dict, source: str) -> tuple[str, object]:
    """(key, value) under the new name for the old key `name` of mapping `data`."""
    new, values = RENAMED[name]
    section = name.rpartition(".")[0]
    if new in data:
        raise UserError(f"{source}: config keys {name!r} and '{section}.{new}' are both given; keep "
                        f"'{section}.{new}' ({name!r} is its old name)")
    if not isinstance(value, bool):
        raise UserError(f"{source}: config key {name!r} (now '{section}.{new}') expects true or false, got {value!r}")
    return new, values[value]


def _coerce(value, hint, name: str, source: str):
    """Check `value` against the annotation `hint` (int/float/str/bool/dict/tuple, optionally | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = UserError(f"{source}: config key {name!r} expects {_describe(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, name, source) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-8 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(f"unsupported config type {hint} for {name}")


def _describe(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} values"
    return {bool: "true or false", float: "a number", int: "an integer", str: "a string", dict: "a mapping"}.get(
        hint, str(hint))


def _plain(value):
    """Tuples -> lists, recursively, so the dict is YAML / JSON / weights_only friendly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
