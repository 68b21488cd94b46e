"""Paper Figure 6 re-run as small-scale proxies: (a) linear vs ReLU6 bottleneck, (b) shortcut between bottlenecks vs
between expansions vs none.

The paper trains on ImageNet and publishes only curves (PAPER.md section 7); here the four distinct variants train
with one recipe (configs/demo.yaml plus the budget's overrides), the same data and the same seeds, and differ only in
the ablated model argument. The linear bottleneck with bottleneck shortcuts is the design and belongs to both
ablations, so it trains once per seed. A claim "held" when the paper's preferred variant has the highest mean final
validation top-1; when its worst seed is no better than another variant's best seed, the two are called not
separable. Both are statements about this proxy only, never about ImageNet.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# Budgets: the data each writes when none is given (mnv2.data.synthetic shapes, 8 classes, an 80/20 split), the model
# width, the input resolution, the batch, epochs and seeds; every other setting is configs/demo.yaml's. "minutes": all
# runs of both ablations on 2 otherwise idle cores (OMP_NUM_THREADS=2), data writing included.
# quick: the embedded demo set as `mnv2 train` writes it (1920 train / 480 val at 64 px); measured 4 min 56 s.
# full: twice the images at 96 px (3840 / 960: 4.5x the pixels per epoch), 2.5x the epochs, 3 seeds; estimated from
# one seed of all four variants at 16 epochs (16 min 50 s: 15.3 s per epoch and run, about 3 s per run besides).
BUDGETS: dict[str, dict] = {
    "quick": {"data": {"images": 2400, "size": 64}, "width": 0.35, "resolution": 64, "batch_size": 64, "epochs": 8,
              "seeds": [0, 1], "minutes": 5},
    "full": {"data": {"images": 4800, "size": 96}, "width": 0.35, "resolution": 96, "batch_size": 64, "epochs": 20,
             "seeds": [0, 1, 2], "minutes": 62},
}

# The four distinct models: name -> (label, model kwargs). Both switches are always given, so the saved configs of
# two variants differ in exactly the ablated key.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "design": ("linear bottleneck, bottleneck shortcut (the design)",
               {"bottleneck_act": "linear", "shortcut": "bottleneck"}),
    "relu6": ("ReLU6 bottleneck", {"bottleneck_act": "relu6", "shortcut": "bottleneck"}),
    "expansion": ("shortcut between expansions", {"bottleneck_act": "linear", "shortcut": "expansion"}),
    "none": ("no shortcut", {"bottleneck_act": "linear", "shortcut": "none"}),
}

# Paper Figure 6: the variants each panel compares, the one the paper prefers, and its claim.
ABLATIONS: dict[str, dict] = {
    "6a": {"variants": ["design", "relu6"], "preferred": "design", "key": "bottleneck_act",
           "title": "Figure 6a: linear vs ReLU6 bottleneck",
           "claim": "linear bottlenecks train to higher accuracy than non-linear (ReLU6) bottlenecks"},
    "6b": {"variants": ["design", "expansion", "none"], "preferred": "design", "key": "shortcut",
           "title": "Figure 6b: where the shortcut goes",
           "claim": "the shortcut between bottlenecks beats the shortcut between expansions and no shortcut"},
}

RECIPE = "demo.yaml"


def run(budget: str = "quick", data: Path | None = None, *, work_dir: Path, seeds: list[int] | None = None,
        epochs: int | None = None, on_run: Callable[[str, int], None] | None = None) -> dict:
    """Train the four variants under `budget` (a BUDGETS name) on `data` (an ImageFolder with train/ and val/; None
    writes the budget's synthetic shapes under `work_dir/data`) and judge both ablations. `seeds` / `epochs` replace
    the budget's. Runs go to `work_dir/runs/<variant>-seed<seed>` (replaced if present). `on_run(label, seed)` is
    called before each training run. Returns a JSON-serialisable dict (seed keys are strings)."""
    from ..engine import recipes_dir
    from ..engine.finetune import layered_config
    from ..engine.trainer import Trainer
    from ..errors import UserError

    if budget not in BUDGETS:
        raise UserError(f"unknown ablation budget {budget!r}: expected one of {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    seeds = list(b["seeds"] if seeds is None else seeds)
    epochs = b["epochs"] if epochs is None else epochs
    if not seeds or epochs < 1:
        raise UserError(f"ablation: need at least one seed and one epoch, got seeds {seeds}, epochs {epochs}")
    start = time.perf_counter()
    work_dir = Path(work_dir)
    if data is None:
        from ..data.synthetic import write_dataset
        data = write_dataset(work_dir / "data", "classify", images=b["data"]["images"], size=b["data"]["size"])
        data_kind = "synthetic shapes"
    else:
        data_kind = f"ImageFolder {Path(data).name}"
    data = Path(data).resolve()
    if not all((data / split).is_dir() for split in ("train", "val")):
        raise UserError(f"{data}: the ablation needs an ImageFolder with train/ and val/ class folders")
    description = describe_data(data, data_kind)
    # the path as a quoted YAML string: any character survives the override parser
    common = [f"data.root={json.dumps(str(data))}", f"model.width={b['width']}", f"data.resolution={b['resolution']}",
              f"train.batch_size={b['batch_size']}", f"train.epochs={epochs}", "train.eval_every=1",
              "train.checkpoint_every=0"]

    variants = {name: {"label": label, "kwargs": dict(kwargs), "curves": {}, "final": {}, "runs": {}}
                for name, (label, kwargs) in VARIANTS.items()}
    for seed in seeds:
        for name, (label, kwargs) in VARIANTS.items():
            if on_run is not None:
                on_run(label, seed)
            run_dir = work_dir / "runs" / f"{name}-seed{seed}"
            _clear_run(run_dir)
            overrides = common + [f"train.seed={seed}"] + [f"model.kwargs.{k}={v}" for k, v in kwargs.items()]
            cfg, _ = layered_config(recipes_dir() / RECIPE, overrides)
            Trainer(cfg, run_dir, data, progress=False, log=lambda *a, **k: None).fit()
            curve = validation_curve(run_dir)
            v = variants[name]
            v["curves"][str(seed)], v["final"][str(seed)], v["runs"][str(seed)] = curve, curve[-1], str(run_dir)
    for v in variants.values():
        finals = list(v["final"].values())
        v["mean"], v["min"], v["max"] = statistics.mean(finals), min(finals), max(finals)

    settings = {"recipe": RECIPE, "overrides": common, "seeds": seeds, "epochs": epochs, "width": b["width"],
                "resolution": b["resolution"], "batch_size": b["batch_size"], "data_root": str(data)}
    result = {"budget": budget, "data": description, "settings": settings, "variants": variants, "ablations": {}}
    for key, spec in ABLATIONS.items():
        result["ablations"][key] = {"title": spec["title"], "key": spec["key"],
                                    **verdict(variants, spec["variants"], spec["preferred"], spec["claim"])}
    result["seconds"] = time.perf_counter() - start
    return result


def _clear_run(run_dir: Path) -> None:
    """An old run here would have its metrics.jsonl appended to: remove the files this runner's runs leave."""
    import shutil

    if run_dir.is_dir():
        shutil.rmtree(run_dir)


def validation_curve(run_dir: Path) -> list[float]:
    """Validation top-1 after each epoch, from the run's metrics.jsonl (the last record of an epoch wins)."""
    by_epoch: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            by_epoch[record["epoch"]] = record["model/top1"]
    return [by_epoch[e] for e in sorted(by_epoch)]


def describe_data(root: Path, kind: str) -> str:
    """E.g. "synthetic shapes: 8 classes, 1920 train / 480 val images at 64 px" (size from the first image)."""
    from PIL import Image

    counts, classes, first = {}, set(), None
    for split in ("train", "val"):
        files = sorted(p for p in (root / split).glob("*/*") if p.is_file() and not p.name.startswith("."))
        counts[split] = len(files)
        classes |= {p.parent.name for p in files}
        first = first or (files[0] if files else None)
    size = ""
    if first is not None:
        with Image.open(first) as im:
            size = f" at {im.width} px" if im.width == im.height else f" at {im.width}x{im.height} px"
    return f"{kind}: {len(classes)} classes, {counts['train']} train / {counts['val']} val images{size}"


def verdict(variants: dict[str, dict], names: list[str], preferred: str, claim: str) -> dict:
    """Whether the paper's `claim` held on this proxy. `variants[name]` has "label", "final" (seed -> top-1), "mean",
    "min" and "max". held: True when `preferred` has the strictly highest mean, False when not, None when a variant
    has no finished run. separable[other]: the preferred variant's worst seed beats the other's best (else the spreads
    overlap: not separable). The sentence states the means, the spreads and what held, and nothing more."""
    others = [n for n in names if n != preferred]
    out = {"variants": list(names), "preferred": preferred, "claim": claim}
    if any(not variants.get(n, {}).get("final") for n in names):
        missing = [n for n in names if not variants.get(n, {}).get("final")]
        return {**out, "held": None, "separable": {},
                "sentence": f"Not measured: no finished run of {', '.join(missing)}; the claim ({claim}) is untested."}
    p = variants[preferred]
    held = all(p["mean"] > variants[o]["mean"] for o in others)
    separable = {o: p["min"] > variants[o]["max"] for o in others}
    seeds = min(len(variants[n]["final"]) for n in names)

    def stat(n: str) -> str:
        v = variants[n]
        return f"{v['label']} {v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"

    parts = [f"Final val top-1, mean (min-max) over {seeds} seed{'s' if seeds != 1 else ''}: "
             + "; ".join(stat(n) for n in names) + "."]
    overlap = [variants[o]["label"] for o in others if not separable[o]]
    if held and not overlap:
        parts.append(f"The paper's claim ({claim}) held on this proxy: {p['label']} has the highest mean and its "
                     f"worst seed beats every other variant's best.")
    elif held:
        parts.append(f"{p['label']} has the highest mean, as the paper's claim ({claim}) predicts, but its spread "
                     f"overlaps that of {_join(overlap)}: not separable on this proxy.")
    else:
        beaten_by = [variants[o]["label"] for o in others if variants[o]["mean"] >= p["mean"]]
        clearly = [variants[o]["label"] for o in others
                   if variants[o]["mean"] >= p["mean"] and variants[o]["min"] > p["max"]]
        tail = (f"; {_join(clearly)} separably so (its worst seed beats {p['label']}'s best)" if clearly
                else "; the spreads overlap: not separable")
        parts.append(f"The paper's claim ({claim}) did not hold on this proxy: {_join(beaten_by)} reached a mean at "
                     f"least as high as {p['label']}'s{tail}.")
    if seeds < 2:
        parts.append("With one seed no spread was measured.")
    return {**out, "held": held, "separable": separable, "sentence": " ".join(parts)}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def draw(result: dict, out_dir: Path) -> list[Path]:
    """fig6a.png and fig6b.png in `out_dir`: validation top-1 against epoch, one line per variant (mean over seeds)
    with a shaded min-max band, titled as the proxy it is. Returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..atomic import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, ablation in sorted(result["ablations"].items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name in ablation["variants"]:
            v = result["variants"][name]
            curves = list(v["curves"].values())
            if not curves:
                continue
            length = min(len(c) for c in curves)  # every seed runs the same epochs; guard a short one anyway
            runs = np.array([c[:length] for c in curves], dtype=float)
            epochs = np.arange(1, length + 1)
            line, = ax.plot(epochs, runs.mean(0), marker="o", markersize=3, label=v["label"])
            ax.fill_between(epochs, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        settings = result["settings"]
        seeds = len(settings["seeds"])
        model = (f", MobileNetV2 {settings['width']:g} at {settings['resolution']} px" if "width" in settings else "")
        ax.set_title(f"proxy: {ablation.get('title', 'Figure ' + key)}{model}\non {result['data']}, not ImageNet",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation top-1 (mean, min-max over {seeds} seed{'s' if seeds != 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"fig{key}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
