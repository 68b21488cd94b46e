"""Optimisers, learning-rate schedules and the weight EMA of the training recipes (PAPER.md section 5).

RMSProp is written here because torch.optim.RMSprop differs from TensorFlow's, which trained the paper's models: TF adds
epsilon inside the square root, starts the mean square at 1 (not 0) and folds the learning rate into the momentum
buffer. With the TF-Slim recipe's epsilon of 1.0 these are not small differences.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..errors import UserError
from .config import OptimConfig, ScheduleConfig, optimizer_defaults


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow's `tf.compat.v1.train.RMSPropOptimizer` / `ApplyRMSProp` computes it:

        ms  <- decay * ms + (1 - decay) * g^2          (ms starts at 1.0)
        mom <- momentum * mom + lr * g / sqrt(ms + eps)
        w   <- w - mom

    `weight_decay` is L2 regularisation added to the gradient (TF adds it to the loss).
    """

    def __init__(self, params, lr: float = 0.045, decay: float = 0.9, momentum: float = 0.9, eps: float = 1.0,
                 weight_decay: float = 0.0):
        if lr < 0 or not 0 <= decay < 1 or momentum < 0 or eps <= 0:
            raise ValueError(f"bad RMSProp hyper-parameters lr={lr} decay={decay} momentum={momentum} eps={eps}")
        super().__init__(params, {"lr": lr, "decay": decay, "momentum": momentum, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["ms"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ms, mom = state["ms"], state["mom"]
                ms.mul_(group["decay"]).addcmul_(g, g, value=1 - group["decay"])
                mom.mul_(group["momentum"]).addcdiv_(g, ms.add(group["eps"]).sqrt_(), value=group["lr"])
                p.sub_(mom)
        return loss


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """One group, or two when norm-layer parameters and biases (all 1-D tensors here) skip weight decay."""
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    cfg = optimizer_defaults(cfg)  # an unset lr / eps is the chosen optimiser's own default
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    if cfg.name == "rmsprop_tf":
        return RMSpropTF(groups, lr=cfg.lr, decay=cfg.decay, momentum=cfg.momentum, eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    raise UserError(f"optim.name: unknown optimizer {cfg.name!r} (choose rmsprop_tf, sgd or adamw)")


class LRFactor:
    """The learning-rate multiplier at optimizer step `step`: linear warm-up, then exponential, cosine or poly decay.

    Exponential decay is a staircase per `decay_epochs` as in TF-Slim (paper: x0.98 per epoch); cosine, poly and
    warm-up move every step. A plain class (not a lambda) so it is rebuilt from the config, never pickled.
    """

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int):
        if cfg.name not in ("exponential", "cosine", "poly", "constant"):
            raise UserError(f"schedule.name: unknown schedule {cfg.name!r} (choose exponential, cosine, poly or "
                            f"constant)")
        self.cfg, self.steps_per_epoch = cfg, max(1, steps_per_epoch)
        self.total = max(1, epochs * self.steps_per_epoch)
        self.warmup = round(cfg.warmup_epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        if step < self.warmup:
            return cfg.warmup_start + (1 - cfg.warmup_start) * step / self.warmup
        if cfg.name == "exponential":
            return cfg.gamma ** math.floor(step / self.steps_per_epoch / cfg.decay_epochs)
        if cfg.name == "cosine":
            t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.name == "poly":
            t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return cfg.min_lr + (1 - cfg.min_lr) * (1 - t) ** cfg.power
        return 1.0


def build_schedule(optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """A per-step LambdaLR; its state_dict holds only numbers (the factor is rebuilt from the config)."""
    return LambdaLR(optimizer, LRFactor(cfg, steps_per_epoch, epochs))


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """Exponential moving average of weights and BN statistics (TF-Slim: 0.9999 per step), evaluated separately."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
