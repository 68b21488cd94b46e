"""One training loop for every task, in one process or under torchrun (DDP).

The task adapter (engine/tasks/) supplies data, batching, model, loss and metrics; this file owns everything else: the
optimizer and schedule, EMA, mixed precision, DDP, progress, metrics.jsonl / TensorBoard, and the run directory with
its atomically written, resumable checkpoint (DESIGN.md "Contracts").
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data.loader import build_loader
from ..errors import UserError
from ..progress import progress_bar
from . import bf16, distributed, fastpath, finetune
from . import checkpoint as ckpt
from .config import Config, config_from_dict, dump_yaml
from .data_order import ResumableSampler, SeededSamples, ShardSampler
from .optim import build_ema, build_optimizer, build_schedule
from .tasks import build_task, evaluate


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)  # last evaluation: {"model": {...}, "ema": {...}}
    best: dict = field(default_factory=dict)  # {"metric": ..., "value": ..., "epoch": ..., "weights": "model"|"ema"}
    seconds: float = 0.0
    steps: int = 0
    bad_images: str = ""


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, data_root: str | Path, resume: bool = False,
                 progress: bool = True, log=print):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        t = cfg.train
        self.device = fastpath.pick_device(t.device)
        self.ctx = distributed.init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.ctx.local_rank)
            torch.cuda.set_device(self.device)
        self.log = log if self.ctx.is_main else (lambda *a, **k: None)
        if t.threads:
            torch.set_num_threads(t.threads)
        _seed_everything(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        self.task = build_task(cfg, Path(data_root))
        train_ds, val_ds = self.task.datasets()
        self.train_sampler = ResumableSampler(train_ds, self.ctx.world_size, self.ctx.rank, shuffle=True,
                                              seed=t.seed, drop_last=True)
        self.train_loader = self._loader(SeededSamples(train_ds), self.train_sampler, t.batch_size, drop_last=True)
        self.val_loader = self._loader(val_ds, ShardSampler(val_ds, self.ctx.world_size, self.ctx.rank),
                                       t.batch_size, drop_last=False)
        self.steps_per_epoch = len(self.train_sampler) // t.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{data_root}: {len(train_ds)} training images make no full batch of {t.batch_size} per "
                            f"process; lower --batch-size")
        self.train_dataset, self.val_dataset = train_ds, val_ds

        try:
            model = self.task.build_model()
        except (ValueError, TypeError) as e:  # a model argument the model rejects (model.width, model.kwargs.*)
            name, kwargs = self.task.model_spec()
            raise UserError(f"model {name!r} with {kwargs}: {e}") from None
        if cfg.model.init_weights and not resume:  # a resumed run has its weights in last.pt
            self.log(finetune.load_init_weights(model, self.task.model_spec()[0], cfg.model.init_weights))
        if cfg.model.freeze == "backbone":
            self.log(f"backbone frozen: {finetune.freeze(model):,} parameters train")
        if cfg.model.freeze_bn:
            model.apply(finetune.bn_to_eval)
        if cfg.model.sync_bn and self.ctx.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        if self.device.type == "cpu":
            bf16.enable(self.model)  # bf16 autocast: one slow oneDNN gradient computed in fp32 instead
        self.amp_dtype = fastpath.amp_dtype(t.amp, self.device)
        self.scaler = fastpath.grad_scaler(self.device, self.amp_dtype)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.schedule, self.steps_per_epoch, t.epochs)
        self.ema = build_ema(self.model, t.ema_decay, t.ema_warmup)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                            else None) if self.ctx.enabled else self.model)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best = {"metric": self.task.best_metric, "value": -math.inf}
        if resume:
            self._resume(self.run_dir / "last.pt")
        self.writer = None

    # ---- data -------------------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return build_loader(dataset, batch_size, self.cfg.data.num_workers, collate_fn=self.task.collate,
                            sampler=sampler, drop_last=drop_last, seed=self.cfg.train.seed,
                            pin_memory=self.device.type == "cuda")

    def _to_device(self, batch):
        return self.task.to_device(batch, self.device, self.memory_format)

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def _model_config(self) -> dict:
        name, kwargs = self.task.model_spec()
        return {"name": name, "kwargs": kwargs}

    def save_checkpoint(self) -> None:
        if not self.ctx.is_main:
            return
        state = {
            "config": self.cfg.to_dict(),
            "model_config": self._model_config(),
            "class_names": self.task.class_names,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": ckpt.scheduler_state(self.schedule),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "world_size": self.ctx.world_size,
            "best": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in self.best.items()},
        }
        ckpt.save_checkpoint(self.run_dir / "last.pt", state)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        ours, theirs = self._model_config(), state["model_config"]
        if ours != theirs:
            diff = sorted(k for k in set(ours["kwargs"]) | set(theirs["kwargs"])
                          if ours["kwargs"].get(k) != theirs["kwargs"].get(k))
            what = (f"model {theirs['name']!r}, not {ours['name']!r}" if ours["name"] != theirs["name"] else
                    ", ".join(f"{k}={theirs['kwargs'].get(k)!r} (config asks {ours['kwargs'].get(k)!r})"
                              for k in diff))
            raise UserError(f"{path}: cannot resume: the checkpoint holds {what}")
        from ..weights import load_state_dict_strict
        load_state_dict_strict(self.model, state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        best = state.get("best") or {}
        self.best = {**self.best, **{k: v for k, v in best.items() if v is not None}}
        if state["world_size"] != self.ctx.world_size:
            self.log(f"note: {path} was written by {state['world_size']} process(es), resuming with "
                     f"{self.ctx.world_size}: the data order of the rest of this epoch differs")
        ckpt.set_rng_state(state["rng"])
        if self.ctx.is_main:
            self._drop_metrics_after(self.step)
            self._restore_config_copies()
        self.log(f"resumed {path}: epoch {self.epoch + 1}, step {self.step}")

    def _restore_config_copies(self) -> None:
        """best.json / ema.json as their weights' headers say: a kill between writing the weights and their readable
        copy leaves the weights without one (never with the previous weights' copy: mnv2.weights.save_model)."""
        from ..weights import restore_config_copy

        for name in ("best", "ema"):
            path = self.run_dir / f"{name}.safetensors"
            if path.is_file() and restore_config_copy(path):
                self.log(f"wrote {path.with_suffix('.json').name} from {path.name}'s header")

    def _drop_metrics_after(self, step: int) -> None:
        """metrics.jsonl as it was at the checkpoint: the records a killed run wrote after it are written again by
        the resumed run, so they go (atomically; a torn last line from the kill goes too)."""
        from ..atomic import atomic_write_text

        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def close(self) -> None:
        """Let go of the loader workers and the process group while the interpreter is still whole: the loaders'
        persistent workers stop now, and the DDP wrapper, which holds the group besides c10d's registry, goes
        before the group is destroyed (a torchrun process then leaves with os._exit: mnv2.cli.main.entry)."""
        self.ddp = self.train_loader = self.val_loader = None
        gc.collect()
        distributed.shutdown(self.ctx)

    # ---- loop ---------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        t, start = self.cfg.train, time.perf_counter()
        result = TrainResult(self.run_dir)
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from ..atomic import atomic_write_text
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)
        stop = False
        while self.epoch < t.epochs and not stop:
            stop = self._train_epoch()
            if stop:
                break
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.epoch % t.eval_every == 0 or self.epoch == t.epochs:
                result.metrics = self.evaluate_and_save()
            self.save_checkpoint()
        if stop:  # max_steps reached mid-epoch
            result.metrics = self.evaluate_and_save()
            self.save_checkpoint()
        distributed.barrier(self.ctx)
        if self.writer is not None:
            self.writer.close()
        result.best, result.steps = dict(self.best), self.step
        result.seconds = time.perf_counter() - start
        result.bad_images = self._bad_image_report()
        return result

    def _train_epoch(self) -> bool:
        """One epoch (or its rest after a resume); True when train.max_steps was reached."""
        t = self.cfg.train
        self.train_sampler.set_epoch(self.epoch)
        self.train_sampler.start = self.batch_in_epoch * t.batch_size
        self.ddp.train()
        if self.cfg.model.freeze_bn:
            self.model.apply(finetune.bn_to_eval)
        if self.cfg.model.freeze == "backbone":
            finetune.keep_frozen_bn_eval(self.model)
        bar = progress_bar(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                           desc=f"epoch {self.epoch + 1}/{t.epochs}", enabled=self.progress and self.ctx.is_main,
                           leave=True)
        seen, tick = 0, time.perf_counter()
        batches = iter(self.train_loader)
        while self.batch_in_epoch < self.steps_per_epoch:
            batch = self._agreed(lambda: next(batches, None))  # a bad image on one rank stops every rank
            if batch is None:
                break
            loss = self._train_step(self._to_device(batch))
            self.batch_in_epoch += 1
            self.step += 1
            seen += self.task.batch_size(batch) * self.ctx.world_size
            rate = seen / max(1e-9, time.perf_counter() - tick)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
            bar.update()
            self._log_step(loss, lr, rate)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.batch_in_epoch < self.steps_per_epoch:
                self.save_checkpoint()
            if t.max_steps and self.step >= t.max_steps:
                bar.close()
                return True
        bar.close()
        return False

    def _train_step(self, batch) -> float:
        cfg = self.cfg
        with fastpath.autocast(self.device, self.amp_dtype):
            loss = self.task.loss(self.ddp, batch)

        def check() -> None:  # before the backward pass's all-reduce, so all ranks stop together
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at step {self.step + 1} (loss {loss.item()}); lower optim.lr")
        self._agreed(check)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.item()

    def _log_step(self, loss: float, lr: float, rate: float) -> None:
        if not self.ctx.is_main:
            return
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/images_per_s", rate, self.step)
        every = max(1, self.steps_per_epoch // 10)
        if self.step % every == 0 or self.batch_in_epoch == self.steps_per_epoch:
            self._append_metrics({"kind": "train", "epoch": self.epoch, "step": self.step, "loss": loss, "lr": lr,
                                  "images_per_s": rate})

    def _append_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(self.task, model, self.val_loader, self.device, self.ctx, self.memory_format,
                        self.amp_dtype)[0]

    def evaluate_and_save(self) -> dict:
        results = {"model": self.evaluate(self.model)}
        if self.ema is not None:
            results["ema"] = self.evaluate(self.ema.module)
        if not self.ctx.is_main:
            return results
        key = self.task.best_metric
        self._append_metrics({"kind": "eval", "epoch": self.epoch, "step": self.step, **{
            f"{which}/{k}": v for which, m in results.items() for k, v in m.items()}})
        for which, m in results.items():
            for k, v in m.items():
                self.writer.add_scalar(f"val_{which}/{k}", v, self.step)
        line = ", ".join(f"{which} {self.task.format_metrics(m)}" for which, m in results.items())
        self.log(f"epoch {self.epoch}/{self.cfg.train.epochs} (step {self.step}): val {line}")
        if self.ema is not None:
            self.task.save_weights(self.run_dir / "ema.safetensors", self.ema.module, weights="ema",
                                   epoch=self.epoch, metrics=results["ema"])
        which = max(results, key=lambda w: results[w][key])
        if results[which][key] > self.best["value"]:
            self.best = {"metric": key, "value": results[which][key], "epoch": self.epoch, "step": self.step,
                         "weights": which}
            model = self.model if which == "model" else self.ema.module
            self.task.save_weights(self.run_dir / "best.safetensors", model, weights=which, epoch=self.epoch,
                                   metrics=results[which])
        return results

    def _agreed(self, work):
        """`work()`, with the ranks agreeing on stopping: when it raises a UserError on any rank (every rank calls this
        at the same point), every rank raises it, instead of the others waiting in their next collective."""
        try:
            result, error = work(), None
        except UserError as e:
            result, error = None, str(e)
        distributed.raise_first_error(error, self.ctx)
        return result

    def _bad_image_report(self) -> str:
        """Images skipped under on_bad_image="skip", collected by the datasets across worker processes and ranks."""
        from ..data.imagefolder import BadImageReport

        mine = {split: ds.bad_images(max_examples=None).examples
                for split, ds in (("train", self.train_dataset), ("val", self.val_dataset))}
        gathered = distributed.gather_objects(mine, self.ctx)
        if gathered is None:
            return ""
        lines = []
        for split in mine:
            seen = dict(item for rank in gathered for item in rank[split])
            if seen:
                report = BadImageReport(len(seen), list(seen.items())[:5])
                lines.append(f"{split}: {report.format()}")
        return "\n".join(lines)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_of_run(run_dir: str | Path) -> Config:
    """The resolved config a run was started with (its config.yaml, else its last.pt)."""
    import yaml
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.is_file():
        return config_from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))
    state = ckpt.load_checkpoint(run_dir / "last.pt")
    return config_from_dict(state["config"], source=str(run_dir / "last.pt"))
