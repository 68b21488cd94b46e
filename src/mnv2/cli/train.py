"""`mnv2 train`: train a classifier from a YAML recipe, flags and `--set` overrides; one process or torchrun."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..errors import UserError

DEFAULT_DATA = Path("data") / "shapes"  # the embedded dataset is written here when --data is not given
DEFAULT_CONFIGS = {"classification": "demo.yaml", "detection": "demo_detection.yaml",
                   "segmentation": "demo_segmentation.yaml"}  # recipe without --config


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a MobileNetV2 classifier, SSDLite detector or DeepLabv3 segmenter (no arguments: the "
        "embedded demo)",
        description="Train a classifier on an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*) or, with --task "
        "detection, an SSDLite detector on COCO-format data (DIR/{train,val}2017/ + DIR/annotations/"
        "instances_{train,val}2017.json, or any files through --set data.train_images=... data.train_annotations=..."
        ") or, with --task segmentation, Mobile DeepLabv3 on PASCAL VOC 2012 (DIR/VOCdevkit/VOC2012, + SBD in "
        "DIR/benchmark_RELEASE for train_aug). Without --data: the embedded 'shapes' dataset (written to ./data/shapes if missing). Settings come from "
        "the dataclass defaults, then --config YAML (default: the task's demo recipe), then the flags, then --set "
        "overrides. Works unchanged under `torchrun --nproc_per_node N -m mnv2.cli.main train ...` (DDP).")
    p.add_argument("--task", choices=("classification", "detection", "segmentation"),
                   help="what to train (default: the recipe's task, classification)")
    p.add_argument("--config", metavar="YAML", help="recipe: a path, or a name in the package's configs/ "
                   "(e.g. imagenet_mnv2_1.0_224.yaml); default demo.yaml")
    p.add_argument("--data", metavar="DIR", help="dataset root: an ImageFolder with train/ and val/, COCO, or VOC "
                   "(default: the embedded shapes data)")
    p.add_argument("--model", help="registered model name (model.name)")
    p.add_argument("--width", type=float, help="width multiplier alpha (model.width)")
    p.add_argument("--resolution", type=int, help="training / evaluation input size (data.resolution)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="per-process batch size (train.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    p.add_argument("--init-weights", metavar="FILE", help="start from an mnv2 weights file (model.init_weights): "
                   "a converted torchvision / timm / Keras file or a run's best.safetensors; its model, width and "
                   "preprocessing are the defaults, a new classifier if the data has other classes (fine-tuning)")
    p.add_argument("--freeze", choices=("none", "backbone"), help="backbone: train only the classifier (a linear "
                   "probe; model.freeze); default none")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="train.device (auto: CUDA when present)")
    p.add_argument("--seed", type=int, help="train.seed (data order, augmentation, initialisation)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "fp32"), help="mixed precision (train.amp; auto: bf16 "
                   "where the CPU or GPU computes it natively)")
    p.add_argument("--workers", type=int, help="data loading worker processes (data.num_workers)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/train-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--on-bad-image", choices=("error", "skip"), help="unreadable image: stop naming it (error, "
                   "default) or skip it and report at the end")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.1 --set train.ema_decay=0.999")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    # The allocator must be chosen before the process starts (LD_PRELOAD): re-exec once (engine/fastpath.py).
    if sys.argv[1:2] == ["train"]:
        from ..engine.fastpath import maybe_reexec
        maybe_reexec(sys.argv[1:])
    from ..engine.config import load_config
    from ..engine.fastpath import allocator_in_use
    from ..engine.trainer import Trainer, config_of_run

    cfg, notes = resolve_config(args, load_config, config_of_run)
    is_main = int(os.environ.get("RANK", "0")) == 0
    say = print if is_main else (lambda *a, **k: None)
    if args.resume:  # the arguments are checked before any work (the embedded data is written on first use)
        run_dir = Path(args.resume)
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"{run_dir}: no last.pt to resume from")
    else:
        run_dir = Path(args.out) if args.out else Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
        if (run_dir / "last.pt").exists():
            raise UserError(f"{run_dir}: already holds a run (last.pt); use --resume {run_dir} or another --out")
    data_root = prepare_data_once(cfg, say)
    for note in notes:
        say(note)
    say(f"run directory: {run_dir}  (allocator: {allocator_in_use()})")
    trainer = Trainer(cfg, run_dir, data_root, resume=bool(args.resume), progress=not args.no_progress, log=say)
    m = cfg.model
    say(f"training {m.name} width {m.width:g} @ {cfg.data.resolution} on {len(trainer.train_dataset)} images of "
        f"{len(trainer.task.class_names)} classes, {cfg.train.epochs} epochs x {trainer.steps_per_epoch} steps, "
        f"{trainer.ctx.world_size} process(es) on {trainer.device}"
        f"{', autocast ' + str(trainer.amp_dtype).replace('torch.', '') if trainer.amp_dtype else ''}")
    try:
        result = trainer.fit()
    finally:  # on an error too: a process group left to interpreter exit aborts the rank (Trainer.close)
        trainer.close()
    if not is_main:
        return 0
    if result.bad_images:
        print(result.bad_images)
    print(_summary(result, trainer.task, run_dir))
    print("next:")
    print(f"  mnv2 eval --run {run_dir}" + (f" --data {data_root}" if args.data else ""))
    print(f"  mnv2 predict --run {run_dir} IMAGE")
    if cfg.task == "classification":
        print(f"  mnv2 export --run {run_dir} --format onnx --out model.onnx")
        print(f"  mnv2 bench --weights {run_dir / 'best.safetensors'} --resolution "
              f"{cfg.data.eval_resolution or cfg.data.resolution}")
    return 0


def _summary(result, task, run_dir: Path) -> str:
    best, final = result.best, result.metrics.get("model", {})
    key = task.best_metric
    line = f"val {task.format_metrics(final)}" if final else "no evaluation"
    if "ema" in result.metrics:
        line += f", EMA {task.format_metrics(result.metrics['ema'])}"
    if "epoch" in best:
        line += (f"; best {key} {best['value']:.3f} ({best.get('weights')}, epoch {best.get('epoch')}) saved to "
                 f"{run_dir / 'best.safetensors'}")
    return f"done in {result.seconds:.0f} s: {line}"


def resolve_config(args, load_config, config_of_run):
    """Defaults <- recipe (or the resumed run's config) <- flags <- --set."""
    flags = []
    for flag, key in (("model", "model.name"), ("width", "model.width"), ("resolution", "data.resolution"),
                      ("epochs", "train.epochs"), ("batch_size", "train.batch_size"), ("lr", "optim.lr"),
                      ("workers", "data.num_workers"), ("on_bad_image", "data.on_bad_image"),
                      ("init_weights", "model.init_weights"), ("freeze", "model.freeze"), ("device", "train.device"),
                      ("seed", "train.seed"), ("amp", "train.amp")):
        value = getattr(args, flag)
        if value is not None:
            flags.append(f"{key}={value}")
    if args.data:
        flags.append(f"data.root={Path(args.data)}")
    if args.task:
        flags.append(f"task={args.task}")
    if args.resume and not args.config:
        return load_config(None, flags + list(args.set), base=config_of_run(args.resume)), []
    from ..engine.finetune import layered_config
    return layered_config(recipe_path(args.config or DEFAULT_CONFIGS[args.task or "classification"]),
                          flags + list(args.set))


def recipe_path(name: str) -> Path:
    """A recipe: an existing path, or a file name in the project's configs/ folder."""
    path = Path(name)
    if path.is_file():
        return path
    from ..engine import recipes_dir
    candidate = recipes_dir() / path.name
    if candidate.is_file() and path.parent == Path("."):
        return candidate
    raise UserError(f"{name}: no such config file (recipes in {recipes_dir()}: "
                    f"{', '.join(sorted(p.name for p in recipes_dir().glob('*.yaml')))})")


def prepare_data_once(cfg, say) -> Path:
    """`resolve_data`, under torchrun run first by each node's local rank 0 (which may write the embedded dataset)
    and then by the others once it is there; an error on any rank stops every rank with it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return resolve_data(cfg, say)
    from ..engine import distributed
    from ..engine.fastpath import pick_device

    ctx = distributed.init_distributed(pick_device(cfg.train.device))
    root, error = None, None
    for turn in (True, False):  # local rank 0 first, then the rest
        if (ctx.local_rank == 0) == turn:
            try:
                root = resolve_data(cfg, say)
            except UserError as e:
                error = str(e)
        distributed.raise_first_error(error, ctx)
    return root


def resolve_data(cfg, say) -> Path:
    if cfg.data.root:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise UserError(f"{root}: no such data folder")
        return root
    from ..data.synthetic import ensure_demo_dataset
    from ..engine.tasks import DEMO_DATA
    if cfg.task not in DEMO_DATA:
        raise UserError(f"task: unknown task {cfg.task!r} (available: {', '.join(DEMO_DATA)})")
    root = ensure_demo_dataset(DEFAULT_DATA, task=DEMO_DATA[cfg.task])
    say(f"data: the embedded shapes dataset in {root} (use --data DIR for your own data)")
    return root
