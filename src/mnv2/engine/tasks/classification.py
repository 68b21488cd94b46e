"""Image classification on an ImageFolder (or the embedded shapes data): cross-entropy, top-1 / top-5."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate

from ...errors import UserError
from ...eval.classification import STATS, classification_stats, summarize_classification
from .. import distributed
from ..config import Config


class ClassificationTask:
    """Image classification on an ImageFolder (or the embedded shapes data): cross-entropy, top-1 / top-5."""

    name = "classification"
    best_metric = "top1"

    def __init__(self, cfg: Config, data_root: Path):
        self.cfg, self.root = cfg, Path(data_root)
        self.class_names: list[str] = []
        self.mix = None

    def datasets(self):
        from ...data import transforms
        from ...data.imagefolder import ImageFolderDataset

        d = self.cfg.data
        try:
            train_tf = transforms.train_preset(d.resolution, scale=d.scale, hflip=d.hflip,
                                               color_jitter=d.color_jitter, auto_augment=d.auto_augment,
                                               random_erasing=d.random_erasing, mean=d.mean, std=d.std,
                                               interpolation=d.interpolation)
            eval_tf = self.eval_transform()
        except ValueError as e:  # a bad data.* value in the recipe
            raise UserError(f"data: {e}") from None
        train = ImageFolderDataset(self.root, d.train_split, transform=train_tf, on_bad_image=d.on_bad_image)
        val = ImageFolderDataset(self.root, d.val_split, transform=eval_tf, on_bad_image=d.on_bad_image)
        if list(val.classes) != list(train.classes):
            raise UserError(f"{self.root}: {d.val_split}/ has classes {list(val.classes)[:5]}... but "
                            f"{d.train_split}/ has {list(train.classes)[:5]}...; they must match")
        self.class_names = list(train.classes)
        # applied to the batch in the main process (resumable)
        self.mix = transforms.mixup_cutmix(len(self.class_names), d.mixup_alpha, d.cutmix_alpha)
        return train, val

    def eval_transform(self):
        from ...data import transforms

        return transforms.eval_preset_for(self.preprocess())

    def model_spec(self) -> tuple[str, dict]:
        m = self.cfg.model
        return m.name, {"width_mult": m.width, "num_classes": len(self.class_names), "dropout": m.dropout,
                        **m.kwargs}

    def build_model(self) -> nn.Module:
        from ...models import create_model

        name, kwargs = self.model_spec()
        return create_model(name, **kwargs)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        if self.mix is not None:  # mixup / cutmix on the batch, in the main process (seeded, resumable)
            images, labels = self.mix(images, labels)
        logits = model(images)
        return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)

    def collate(self, samples: list):
        return default_collate(samples)

    def to_device(self, batch, device: torch.device, memory_format: torch.memory_format):
        images, labels = batch
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return images, labels.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return batch[0].shape[0]

    def evaluator(self, val_dataset) -> ClassificationEvaluator:
        return ClassificationEvaluator()

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return f"top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} loss {metrics['loss']:.3f}"

    def preprocess(self) -> dict:
        d = self.cfg.data
        return {"mean": list(d.mean), "std": list(d.std), "resolution": d.eval_resolution or d.resolution,
                "crop_fraction": d.crop_fraction, "interpolation": d.interpolation, "resize": d.resize}

    def save_weights(self, path: Path, model: nn.Module, **meta) -> None:
        from ...weights import save_model

        name, kwargs = self.model_spec()
        save_model(path, model, name, kwargs, preprocess=self.preprocess(), class_names=self.class_names, **meta)


class ClassificationEvaluator:
    """Sums [loss, top-1 hits, top-5 hits, images] over batches; one all-reduce combines the ranks."""

    def __init__(self):
        self.stats = torch.zeros(len(STATS), dtype=torch.float64)

    def update(self, model: nn.Module, batch) -> None:
        images, labels = batch
        self.stats += classification_stats(model(images).float(), labels).cpu()

    def compute(self, ctx: distributed.Dist) -> dict[str, float]:
        return summarize_classification(distributed.all_reduce_sum(self.stats.clone(), ctx))
