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
    kwargs: dict = field(default_factory=dict)  # further create_model() arguments (padding, bn_eps, ablations)
    freeze_bn: bool = False  # BN in inference mode while training (fine-tuning; makes every sample independent)
    sync_bn: bool = False  # SyncBatchNorm under DDP (GPU only in PyTorch)
    backbone_weights: str | None = None  # detector / segmenter: start the backbone from a classifier weights file


@dataclass
class DataConfig:
    root: str | None = None  # an ImageFolder with train/ and val/; None = the embedded "shapes" dataset
    train_split: str = "train"
    val_split: str = "val"
    resolution: int = 224  # training crop
    eval_resolution: int | None = None  # None = resolution
    crop_fraction: float = 0.875  # eval: resize to resolution / crop_fraction, centre crop (PAPER.md section 5)
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
    lr: float = 0.045
    momentum: float = 0.9
    nesterov: bool = False
    decay: float = 0.9  # RMSProp's mean-square decay (TF's `decay` / `rho`)
    eps: float = 1.0  # RMSProp: inside the square root (TF); AdamW: torch's eps
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 4e-5
    no_decay_norm_bias: bool = False  # no weight decay on BN parameters and biases
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
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA; TF-Slim used 0.9999 (per step)
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
    return cfg


def config_from_dict(data: dict, source: str) -> Config:
    """A Config from its saved dict form (config.yaml of a run, or a checkpoint)."""
    return merge(Config(), data, source=source)


def merge(obj, data: dict, source: str, prefix: str = ""):
    """A copy of dataclass `obj` with the values of `data` applied, type-checked; unknown keys are a UserError."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"{source}: unknown config key {name!r} (known: {', '.join(sorted(fields))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, source, prefix=f"{name}.")
        else:
            changes[key] = _coerce(value, hints[key], name, source)
    return dataclasses.replace(obj, **changes)


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
