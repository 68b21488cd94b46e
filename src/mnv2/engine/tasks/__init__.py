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


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader, device: torch.device, ctx: Dist | None = None,
             memory_format: torch.memory_format = torch.channels_last, amp_dtype: torch.dtype | None = None,
             progress: bool = False):
    """Run `task`'s evaluator over `loader`: the loop `mnv2 train` and `mnv2 eval` share. Returns (metrics, the
    evaluator, which holds task-specific results such as a detector's COCO results entries)."""
    from tqdm import tqdm

    from ..fastpath import autocast

    model.eval()
    evaluator = task.evaluator(loader.dataset)
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        with autocast(device, amp_dtype):
            evaluator.update(model, task.to_device(batch, device, memory_format))
    return evaluator.compute(ctx or Dist()), evaluator
