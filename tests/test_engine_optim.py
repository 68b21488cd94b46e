"""Optimisers and schedules of the recipes (PAPER.md section 5)."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from mnv2.engine.config import OptimConfig, ScheduleConfig
from mnv2.engine.optim import RMSpropTF, build_ema, build_optimizer, build_schedule, ema_decay_at, is_depthwise
from mnv2.errors import UserError
from mnv2.models import create_model


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


def decayed_ids(opt) -> set[int]:
    return {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4))
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=0.5, decay_scope="no_norm_bias"))
    assert decayed_ids(opt) == {id(model[0].weight), id(model[2].weight)}  # the depthwise kernel too
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=0.1, weight_decay=0.5))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.5


def test_tf_slim_decay_scope_on_mobilenet_v2():
    """TF-Slim's training scope decays regular conv and FC kernels only. MobileNetV2 (Table 2) has 36 of them: the stem,
    16 expansions (the t = 1 block has none), 17 projections, the 1280-channel conv and the classifier; one step with
    zero gradients shrinks exactly those and leaves the depthwise kernels, BN parameters and the bias untouched."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", width_mult=0.35, num_classes=10)
    with torch.no_grad():  # non-trivial values everywhere, so "untouched" means something (BN starts at 1 / 0)
        for p in model.parameters():
            p.add_(torch.rand_like(p))
    blocks = list(model.blocks)
    kernels = [model.stem.conv.weight, *(b.expand.conv.weight for b in blocks if b.expand is not None),
               *(b.project.conv.weight for b in blocks), model.head.conv.weight, model.classifier.weight]
    assert len(kernels) == 1 + 16 + 17 + 1 + 1
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5,
                                             decay_scope="tf_slim"))
    assert decayed_ids(opt) == {id(k) for k in kernels}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = decayed_ids(opt)
    for name, p in model.named_parameters():
        if id(p) in decayed:  # w -= lr * wd * w
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5), msg=name)
        else:
            assert torch.equal(p.detach(), before[name]), name
    assert not any(id(b.dw.conv.weight) in decayed for b in blocks)


@pytest.mark.parametrize("name,kwargs", [
    ("shufflenet_v1", {"width_mult": 0.5}),
    ("mobilenet_v1", {"width_mult": 0.25}),
    ("ssdlite_mobilenet_v2", {"width_mult": 0.35, "num_classes": 3}),
    ("deeplabv3_mobilenet_v2", {"width_mult": 0.35, "num_classes": 3, "aspp": True}),
])
def test_tf_slim_decay_scope_on_other_models(name, kwargs):
    """Every model: decayed = conv kernels that are not depthwise (groups == in_channels) + Linear weights. Grouped
    convs that are not depthwise (ShuffleNet's g = 3 pointwise convs) are regular convs and decayed."""
    model = create_model(name, **kwargs)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    depthwise = [m for m in convs if is_depthwise(m)]
    assert depthwise and len(depthwise) < len(convs)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=4e-5, decay_scope="tf_slim"))
    decayed = decayed_ids(opt)
    assert decayed == {id(m.weight) for m in convs if not is_depthwise(m)} | {id(m.weight) for m in linears}
    assert all(p.ndim > 1 for p in model.parameters() if id(p) in decayed)  # no BN parameter, no bias
    if name == "shufflenet_v1":
        grouped = [m for m in convs if 1 < m.groups < m.in_channels]
        assert grouped and all(id(m.weight) in decayed for m in grouped)


def test_decay_scope_config_and_its_old_name():
    """optim.decay_scope is checked where the config is merged; the old boolean optim.no_decay_norm_bias (older
    recipes, saved runs) still reads as no_norm_bias / all, and giving both is one clear error."""
    from mnv2.engine.config import config_from_dict, load_config

    assert load_config(None).optim.decay_scope == "all"
    assert load_config(None, ["optim.no_decay_norm_bias=true"]).optim.decay_scope == "no_norm_bias"
    old_run = {"optim": {"name": "sgd", "no_decay_norm_bias": False}}
    assert config_from_dict(old_run, "run/config.yaml").optim.decay_scope == "all"
    with pytest.raises(UserError, match=r"'optim.decay_scope' is 'slim'; choose one of all, no_norm_bias, tf_slim"):
        load_config(None, ["optim.decay_scope=slim"])
    with pytest.raises(UserError, match=r"'optim.no_decay_norm_bias' and 'optim.decay_scope' are both given"):
        config_from_dict({"optim": {"no_decay_norm_bias": True, "decay_scope": "tf_slim"}}, "x.yaml")
    with pytest.raises(UserError, match=r"'optim.no_decay_norm_bias' \(now 'optim.decay_scope'\) expects true or"):
        load_config(None, ["optim.no_decay_norm_bias=maybe"])


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


def ema_trace(ema, model, weights) -> list[float]:
    out = []
    for w in weights:
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update_parameters(model)
        out.append(ema.module.weight.item())
    return out


def test_ema_warmup_is_tfs_num_updates_decay():
    """TF's ExponentialMovingAverage(decay, num_updates): the update after n others uses min(decay, (1+n)/(10+n))."""
    assert [ema_decay_at(0.9999, n, True) for n in range(4)] == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13])
    assert ema_decay_at(0.9999, 100_000, True) == 0.9999 and ema_decay_at(0.9999, 1, False) == 0.9999
    model = nn.Linear(1, 1, bias=False).double()
    # decay 0.25: the warm-up decides the 2nd update (2/11), the cap from the 3rd on ((1+n)/(10+n) >= 0.25 for n >= 2)
    trace = ema_trace(build_ema(model, 0.25, warmup=True), model, [1.0, 3.0, -2.0, 5.0])
    # by hand: copy 1; 2/11 * 1 + 9/11 * 3 = 29/11; 0.25 * 29/11 + 0.75 * -2 = -37/44;
    # 0.25 * -37/44 + 0.75 * 5 = 623/176
    assert trace == pytest.approx([1.0, 29 / 11, -37 / 44, 623 / 176], rel=1e-12)
    # decay 0.9999: every early update follows the warm-up's (1+n)/(10+n)
    trace = ema_trace(build_ema(model, 0.9999, warmup=True), model, [1.0, 3.0, -2.0])
    e2 = 2 / 11 * 1 + 9 / 11 * 3
    assert trace == pytest.approx([1.0, e2, 3 / 12 * e2 + 9 / 12 * -2], rel=1e-12)


def test_ema_default_has_no_warmup():
    """Without train.ema_warmup (the default) every update after the first uses the fixed decay, as before."""
    from mnv2.engine.config import load_config

    assert load_config(None).train.ema_warmup is False
    model = nn.Linear(1, 1, bias=False).double()
    trace = ema_trace(build_ema(model, 0.9999), model, [1.0, 3.0, -2.0])
    e2 = 0.9999 * 1 + 0.0001 * 3
    assert trace == pytest.approx([1.0, e2, 0.9999 * e2 + 0.0001 * -2], rel=1e-12)


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
