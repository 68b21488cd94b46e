"""Every shipped recipe in configs/ parses against the typed config and builds its model, optimizer and schedule."""

from pathlib import Path

import pytest
import torch

from mnv2.engine import recipes_dir
from mnv2.engine.config import load_config
from mnv2.engine.optim import RMSpropTF, build_optimizer, build_schedule
from mnv2.errors import UserError
from mnv2.models import create_model

RECIPES = sorted(recipes_dir().glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "imagenet_mnv2_1.0_224.yaml", "imagenet_mnv2_1.0_224_tv2.yaml", "demo_detection.yaml",
            "coco_ssdlite_mnv2.yaml", "coco_ssdlite_mnv2_tv.yaml", "demo_segmentation.yaml",
            "voc_deeplabv3_mnv2.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_builds(path: Path):
    cfg = load_config(path)
    if cfg.task == "detection":
        model = create_model(cfg.model.name, width_mult=cfg.model.width, num_classes=80,
                             image_size=cfg.data.resolution, **cfg.model.kwargs)
    else:
        model = create_model(cfg.model.name, width_mult=cfg.model.width, num_classes=1000,
                             dropout=cfg.model.dropout, **cfg.model.kwargs)
    opt = build_optimizer(model, cfg.optim)
    sched = build_schedule(opt, cfg.schedule, steps_per_epoch=100, epochs=cfg.train.epochs)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * sched.lr_lambdas[0](0))
    assert 32 <= cfg.data.resolution <= 513 and (cfg.data.eval_resolution or cfg.data.resolution) >= 32
    if cfg.task == "detection":
        from mnv2.detection import ssd_anchors
        layout = cfg.model.kwargs.get("anchor_layout", "tf")
        cls, box = model.eval()(torch.zeros(1, 3, 64, 64))  # any size works; keep the test fast
        assert cls.shape == (1, len(ssd_anchors(64, layout=layout)), 81) and box.shape[-1] == 4
    elif cfg.task == "segmentation":
        out = model.eval()(torch.zeros(1, 3, 40, 56))  # any size: per-pixel logits at the input's size
        assert out.shape == (1, 1000, 40, 56)
    else:
        out = model.eval()(torch.zeros(1, 3, 32, 32))  # the network is fully convolutional; keep the test fast
        assert out.shape == (1, 1000)


def test_detection_recipes_are_their_sources():
    """PAPER.md section 8: TF's SSDLite recipe (RMSProp 0.004, batch 24, sigmoid loss, TF anchors, 320 input) and
    torchvision's (SGD 0.15 cosine, softmax loss, its anchor layout)."""
    tf = load_config(recipes_dir() / "coco_ssdlite_mnv2.yaml")
    assert (tf.optim.name, tf.optim.lr, tf.optim.momentum, tf.optim.decay, tf.optim.eps) == (
        "rmsprop_tf", 0.004, 0.9, 0.9, 1.0)
    assert (tf.train.batch_size, tf.optim.weight_decay, tf.data.resolution) == (24, 4e-5, 320)
    assert (tf.detection.loss, tf.detection.neg_pos_ratio, tf.detection.nms_iou) == ("sigmoid", 3.0, 0.6)
    assert tf.model.kwargs["anchor_layout"] == "tf"
    tv = load_config(recipes_dir() / "coco_ssdlite_mnv2_tv.yaml")
    assert (tv.optim.name, tv.optim.lr, tv.schedule.name, tv.detection.loss) == ("sgd", 0.15, "cosine", "softmax")
    assert tv.model.kwargs["anchor_layout"] == "torchvision"
    # BatchNorm as each source trains it, on every BN of the built detector: TF decay 0.9997 / eps 1e-3,
    # torchvision momentum 0.03 / eps 1e-3
    for cfg, expected in ((tf, (0.0003, 1e-3)), (tv, (0.03, 1e-3))):
        assert bn_settings(cfg) == {expected}


def bn_settings(cfg) -> set[tuple[float, float]]:
    model = create_model(cfg.model.name, width_mult=0.35, num_classes=3, **cfg.model.kwargs)
    return {(m.momentum, m.eps) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}


def test_voc_recipe_is_tf_deeplabs():
    """PAPER.md section 9: the on-device model (MNet V2*, OS 16, no ASPP) on train_aug, crop 513, random scale
    0.5-2.0, flip, poly schedule with power 0.9, weight decay 4e-5, a batch that trains BN (>= 12)."""
    cfg = load_config(recipes_dir() / "voc_deeplabv3_mnv2.yaml")
    assert (cfg.task, cfg.model.name, cfg.model.kwargs["output_stride"], cfg.model.kwargs["aspp"]) == (
        "segmentation", "deeplabv3_mobilenet_v2", 16, False)
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.resolution, cfg.data.rescale) == (
        "train_aug", "val", 513, (0.5, 2.0))
    assert (cfg.schedule.name, cfg.schedule.power, cfg.optim.weight_decay) == ("poly", 0.9, 4e-5)
    assert cfg.train.batch_size >= 12 and cfg.model.dropout == 0.1
    assert bn_settings(cfg) == {(0.003, 1e-3)}  # TF-Slim's backbone BN (decay 0.997), on the head too


def test_paper_recipe_is_the_paper_s():
    """PAPER.md section 5: RMSProp decay 0.9 / momentum 0.9, wd 4e-5, lr 0.045 x 0.98 per epoch, batch 96."""
    cfg = load_config(recipes_dir() / "imagenet_mnv2_1.0_224.yaml")
    model = create_model("mobilenet_v2", num_classes=10)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, RMSpropTF)
    g = opt.param_groups[0]
    assert (g["lr"], g["decay"], g["momentum"], g["weight_decay"]) == (0.045, 0.9, 0.9, 4e-5)
    sched = build_schedule(opt, cfg.schedule, steps_per_epoch=10, epochs=3)
    assert sched.lr_lambdas[0](10) == pytest.approx(0.98)
    assert cfg.train.batch_size == 96


TF_SLIM_RECIPES = sorted(p for p in RECIPES if p.name.startswith("imagenet_mnv2_") and not p.stem.endswith("_tv2"))


@pytest.mark.parametrize("path", TF_SLIM_RECIPES, ids=lambda p: p.name)
def test_paper_recipes_train_as_tf_slim(path: Path, tmp_path):
    """PAPER.md section 5 / TF-Slim's training scope: BN decay 0.997 (momentum 0.003) and epsilon 1e-3 on the model
    the recipe builds, weight decay on regular conv and FC kernels only, the paper's 0.98 per epoch, and TF's EMA
    with its num_updates warm-up."""
    from mnv2.engine.tasks import build_task

    cfg = load_config(path)
    task = build_task(cfg, tmp_path)
    task.class_names = [str(i) for i in range(10)]
    bns = [m for m in task.build_model().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and {(m.momentum, m.eps) for m in bns} == {(0.003, 1e-3)}
    assert (cfg.optim.decay_scope, cfg.optim.weight_decay) == ("tf_slim", 4e-5)
    assert (cfg.schedule.name, cfg.schedule.gamma, cfg.schedule.decay_epochs) == ("exponential", 0.98, 1.0)
    assert (cfg.train.ema_decay, cfg.train.ema_warmup) == (0.9999, True)


def test_torchvision_recipe_keeps_pytorch_bn():
    """torchvision's V2 recipe trained with PyTorch's BN defaults and no decay on norm layers (PAPER.md section 5)."""
    cfg = load_config(recipes_dir() / "imagenet_mnv2_1.0_224_tv2.yaml")
    model = create_model(cfg.model.name, width_mult=cfg.model.width, num_classes=10, **cfg.model.kwargs)
    assert {(m.momentum, m.eps) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(0.1, 1e-5)}
    assert cfg.optim.decay_scope == "no_norm_bias" and not cfg.train.ema_warmup


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(recipes_dir() / "demo.yaml", ["optim.lr=0.1", "data.scale=[0.5, 1.0]", "model.kwargs={bn_eps: 0.001}"])
    assert cfg.optim.lr == 0.1 and cfg.data.scale == (0.5, 1.0) and cfg.model.kwargs == {"bn_eps": 0.001}
    with pytest.raises(UserError, match=r"--set: unknown config key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=0.1"])
    with pytest.raises(UserError, match=r"'train.epochs' expects an integer, got 'ten'"):
        load_config(None, ["train.epochs=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 0.5\n")
    with pytest.raises(UserError, match=rf"{bad}: unknown config key 'model.widht'"):
        load_config(bad)
    with pytest.raises(UserError, match="unknown config key 'modle'"):
        load_config(None, ["modle.width=1"])


def test_a_detector_refuses_label_smoothing_its_loss_does_not_have():
    assert load_config(recipes_dir() / "demo_detection.yaml").train.label_smoothing == 0
    with pytest.raises(UserError, match=r"'train.label_smoothing' is 0.1: the detection loss .* does not smooth"):
        load_config(recipes_dir() / "demo_detection.yaml", ["train.label_smoothing=0.1"])
