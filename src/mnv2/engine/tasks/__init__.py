"""Task adapters: everything the one training loop, `mnv2 eval` and the deployers need to know about a task.

A task builds its datasets and model, batches samples (`collate`) and moves a batch to the device (`to_device`),
turns a batch into a loss, accumulates evaluation over batches and combines it across ranks (`evaluator`), formats
its metrics for the log line, and writes deployable weights. The loop (engine/trainer.py) only calls these; adding a
task means adding a module here and a line to `TASKS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ...errors import UserError
from ..config import Config
from ..distributed import Dist


class Evaluator(Protocol):
    def update(self, model: nn.Module, batch) -> None: ...
    def compute(self, ctx: Dist) -> dict[str, float]: ...  # combined over ranks; every rank gets the metrics


class Task(Protocol):
    name: str  # "classification", "detection", "segmentation"
    cfg: Config
    best_metric: str  # the metric (higher is better) that picks best.safetensors
    class_names: list[str]

    def datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]: ...
    def collate(self, samples: list): ...
    def to_device(self, batch, device: torch.device, memory_format: torch.memory_format): ...
    def batch_size(self, batch) -> int: ...
    def model_spec(self) -> tuple[str, dict]: ...
    def build_model(self) -> nn.Module: ...
    def loss(self, model: nn.Module, batch) -> torch.Tensor: ...
    def evaluator(self, val_dataset) -> Evaluator: ...
    def format_metrics(self, metrics: dict[str, float]) -> str: ...
    def save_weights(self, path: Path, model: nn.Module, **meta) -> None: ...


TASKS = {"classification": ("classification", "ClassificationTask"),
         "detection": ("detection", "DetectionTask"),
         "segmentation": ("segmentation", "SegmentationTask")}
DEMO_DATA = {"classification": "classify", "detection": "detect", "segmentation": "segment"}  # the embedded dataset each task trains on


def build_task(cfg: Config, data_root: Path) -> Task:
    if cfg.task not in TASKS:
        raise UserError(f"task: unknown task {cfg.task!r} (available: {', '.join(TASKS)})")
    from importlib import import_module
    module, name = TASKS[cfg.task]
    return getattr(import_module(f".{module}", __name__), name)(cfg, Path(data_root))


def build_task_model(task: Task, allowed: tuple[str, ...], kind: str) -> nn.Module:
    """The model `task.model_spec()` names, if it is one of `allowed` (a task's models; `kind` names them in the
    error), with its backbone started from `model.backbone_weights` when the config gives a classifier file."""
    from ...models import create_model

    name, kwargs = task.model_spec()
    if name not in allowed:
        raise UserError(f"model.name: {name!r} is not {kind} (available: {', '.join(allowed)}; the {task.name} "
                        f"recipes set it)")
    model = create_model(name, **kwargs)
    if task.cfg.model.backbone_weights:
        load_backbone_weights(model, task.cfg.model.backbone_weights)
    return model


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise a detector's or segmentation model's backbone from a classifier weights file (the paper starts
    from ImageNet weights)."""
    from ...weights import read_weights

    state, config = read_weights(path)  # a UserError naming the file if it is not an mnv2 weights file
    if not hasattr(model, "load_backbone_state"):
        raise UserError(f"model.backbone_weights: {type(model).__name__} has no backbone to initialise")
    kwargs = config.get("model_kwargs", {})
    width = getattr(model, "width_mult", None)
    if width is not None and kwargs.get("width_mult", 1.0) != width:
        raise UserError(f"{path}: backbone weights of width {kwargs.get('width_mult', 1.0)} cannot initialise a "
                        f"width {width} {type(model).__name__} (set model.width to match)")
    model.load_backbone_state(state, source=str(path))


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader, device: torch.device, ctx: Dist | None = None,
             memory_format: torch.memory_format = torch.channels_last, amp_dtype: torch.dtype | None = None,
             progress: bool = False):
    """Run `task`'s evaluator over `loader`: the loop `mnv2 train` and `mnv2 eval` share. Returns (metrics, the
    evaluator, which holds task-specific results such as a detector's COCO results entries)."""
    from ...progress import progress_bar
    from ..distributed import raise_first_error
    from ..fastpath import autocast

    ctx = ctx or Dist()
    model.eval()
    evaluator, error = task.evaluator(loader.dataset), None
    try:
        for batch in progress_bar(loader, desc="eval", enabled=progress):
            with autocast(device, amp_dtype):
                evaluator.update(model, task.to_device(batch, device, memory_format))
    except UserError as e:  # e.g. a bad image: every rank stops, none waits for this one's statistics
        error = str(e)
    raise_first_error(error, ctx)
    return evaluator.compute(ctx), evaluator
