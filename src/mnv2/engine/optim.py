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


def is_depthwise(conv: nn.Conv2d) -> bool:
    """A depthwise convolution: one group per input channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels


def tf_slim_kernels(model: nn.Module) -> list[nn.Parameter]:
    """The weights TF-Slim's MobileNet `training_scope` regularises: kernels of regular convolutions (`slim.conv2d`,
    the 1x1 logits conv included) and of fully-connected layers. Depthwise kernels are not (`slim.separable_conv2d`
    gets `weights_regularizer=None`), nor BatchNorm parameters, nor biases. A grouped conv that is not depthwise
    (ShuffleNet's) counts as regular: TF-Slim builds group convs from regular ones."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and not is_depthwise(m)]


def param_groups(model: nn.Module, weight_decay: float, scope: str = "all") -> list[dict]:
    """The trainable parameters in one group (`scope` "all"), or two: those weight decay reaches, and the rest with
    none. "no_norm_bias" spares norm-layer parameters and biases (the 1-D tensors here); "tf_slim" decays only
    `tf_slim_kernels`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scope == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    if scope == "no_norm_bias":
        decayed = {id(p) for p in params if p.ndim > 1}
    elif scope == "tf_slim":
        decayed = {id(p) for p in tf_slim_kernels(model)}
    else:
        raise UserError(f"optim.decay_scope: unknown scope {scope!r} (choose all, no_norm_bias or tf_slim)")
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    cfg = optimizer_defaults(cfg)  # an unset lr / eps is the chosen optimiser's own default
    groups = param_groups(model, cfg.weight_decay, cfg.decay_scope)
    if cfg.name == "rmsprop_tf":
        return RMSpropTF(groups, lr=cfg.lr, decay=cfg.decay, momentum=cfg.momentum, eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    raise UserError(f"optim.name: unknown optimizer {cfg.name!r} (choose rmsprop_tf, sgd or adamw)")


class LRFactor:
    """The learning-rate multiplier at optimizer step `step`: linear warm-up, then exponential, cosine or poly decay.

    Exponential decay is a staircase per `decay_epochs` as in TF-Slim (paper: x0.98 per epoch; TF-Slim's released
    flags: x0.98 every 2.5 epochs, docs/training.md); cosine, poly and warm-up move every step. A plain class (not a
    lambda) so it is rebuilt from the config, never pickled.
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


def ema_decay_at(decay: float, n: int, warmup: bool) -> float:
    """The decay of the EMA update that follows `n` earlier ones.

    With `warmup`, TensorFlow's `ExponentialMovingAverage(decay, num_updates)` as TF-Slim's train_image_classifier
    calls it (num_updates = the global step): min(decay, (1 + n) / (10 + n)). At 0.9999 a fixed decay remembers the
    starting weights for ~10,000 steps; the warm-up lets the average follow the weights until (1 + n) / (10 + n)
    reaches `decay` (n ~ 90,000 at 0.9999).
    """
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def build_ema(model: nn.Module, decay: float, warmup: bool = False) -> AveragedModel | None:
    """Exponential moving average of weights and BN statistics (TF-Slim: 0.9999 per step), evaluated separately.

    The first update copies the weights (AveragedModel); every later one blends with `ema_decay_at(decay, n, warmup)`,
    n = updates so far (kept in the EMA's state, so a resumed run continues the warm-up). TF starts the average at the
    initial weights and blends the first update with decay 0.1 instead of copying.
    """
    if not decay:
        return None
    if not warmup:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def blend(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        get_ema_multi_avg_fn(ema_decay_at(decay, int(n_averaged), True))(averaged, current, n_averaged)

    return AveragedModel(model, multi_avg_fn=blend, use_buffers=True)
