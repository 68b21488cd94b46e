"""Optimisers and schedules of the recipes (PAPER.md section 5)."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from mnv2.engine.config import OptimConfig, ScheduleConfig
from mnv2.engine.optim import RMSpropTF, build_ema, build_optimizer, build_schedule


def tf_rmsprop_reference(w, grads, lr, decay, momentum, eps, weight_decay=0.0):
    """TensorFlow's ApplyRMSProp written out in numpy (float64): ms starts at 1, eps inside the square root, the
    learning rate folded into the momentum accumulator; weight decay as an L2 term added to the gradient."""
    w = w.astype(np.float64).copy()
    ms, mom = np.ones_like(w), np.zeros_like(w)
    for g in grads:
        g = g.astype(np.float64) + weight_decay * w
        ms = decay * ms + (1 - decay) * g * g
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        w = w - mom
    return w


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("eps,weight_decay", [(1.0, 0.0), (1e-3, 4e-5)])
def test_rmsprop_tf_matches_tensorflow_formula(steps, eps, weight_decay):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(scale=3.0, size=(5, 3)).astype(np.float32) for _ in range(steps)]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = RMSpropTF([p], lr=0.045, decay=0.9, momentum=0.9, eps=eps, weight_decay=weight_decay)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = tf_rmsprop_reference(w0, grads, 0.045, 0.9, 0.9, eps, weight_decay)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_rmsprop_tf_differs_from_torch_rmsprop():
    """The reason the class exists: torch's RMSprop (ms from 0, eps outside the root) takes a different step."""
    g = torch.full((4,), 0.5)
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    ours = RMSpropTF([a], lr=0.1, eps=1.0)
    theirs = torch.optim.RMSprop([b], lr=0.1, alpha=0.9, eps=1.0, momentum=0.9)
    a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    # one TF step: ms = 0.9 + 0.1 * 0.25 = 0.925; w = -0.1 * 0.5 / sqrt(1.925)
    assert a[0].item() == pytest.approx(-0.05 / math.sqrt(1.925), rel=1e-6)
    assert abs(a[0].item() - b[0].item()) > 1e-3


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=0.5, no_decay_norm_bias=True))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=0.1, weight_decay=0.5))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.5


def test_exponential_schedule_decays_per_epoch():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.045)
    sched = build_schedule(opt, ScheduleConfig(name="exponential", gamma=0.98), steps_per_epoch=10, epochs=5)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[9] == pytest.approx(0.045)
    assert lrs[10] == lrs[19] == pytest.approx(0.045 * 0.98)
    assert lrs[29] == pytest.approx(0.045 * 0.98 ** 2)


def test_cosine_schedule_with_warmup():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start=0.0)
    sched = build_schedule(opt, cfg, steps_per_epoch=4, epochs=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # linear warm-up over 4 steps, then the peak
    assert lrs[4 + 8] == pytest.approx(0.5)  # half-way through the 16 cosine steps
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_poly_schedule_is_deeplabs():
    """DeepLab's poly: lr * (1 - step / total) ** 0.9, after the warm-up, reaching zero at the last step."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_schedule(opt, ScheduleConfig(name="poly", power=0.9), steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(0.5 * (1 - 10 / 40) ** 0.9)
    assert lrs[39] == pytest.approx(0.5 * (1 / 40) ** 0.9)
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_ema_follows_weights():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = build_ema(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)  # 0.5 * 1 + 0.5 * 3
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2.0))
    assert build_ema(model, 0.0) is None


@pytest.mark.parametrize("name,lr,eps", [("rmsprop_tf", 0.045, 1.0), ("sgd", 0.045, 1e-8), ("adamw", 1e-3, 1e-8)])
def test_optimizer_defaults_belong_to_the_optimizer(name, lr, eps):
    """Unset lr / eps take the chosen optimiser's defaults (RMSProp's eps 1.0 must not reach AdamW); set ones stay."""
    from mnv2.engine.config import load_config

    cfg = load_config(None, [f"optim.name={name}"])
    assert (cfg.optim.lr, cfg.optim.eps) == (lr, eps)
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name=name))
    assert opt.param_groups[0]["lr"] == lr
    if name != "sgd":
        assert opt.param_groups[0]["eps"] == eps
    assert load_config(None, [f"optim.name={name}", "optim.lr=0.5", "optim.eps=0.25"]).optim.eps == 0.25
