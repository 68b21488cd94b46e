"""The paper Figure 6 ablation runner: one recipe, data and seeds for every variant, curves from the runs, honest
verdicts, and the two figures."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mnv2.data.synthetic import write_dataset
from mnv2.errors import UserError
from mnv2.paper import ablation
from mnv2.weights import load_model

# A budget small enough for the test suite: 64 train / 16 val images at 32 px, 4 steps of 16 per epoch.
TINY = {"data": {"images": 80, "size": 32}, "width": 0.35, "resolution": 32, "batch_size": 16, "epochs": 2,
        "seeds": [0, 1], "minutes": 0}
SEEDS, EPOCHS = [3, 5], 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One run of the runner on a tiny dataset; (result, data folder, the on_run calls)."""
    root = tmp_path_factory.mktemp("ablation")
    data = write_dataset(root / "data", "classify", images=80, size=32)
    calls = []
    # One intra-op thread: next to the loader's worker on a shared 2-core machine, two threads can stall for minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(ablation.BUDGETS, "tiny", TINY)
            result = ablation.run("tiny", data, work_dir=root / "work", seeds=SEEDS, epochs=EPOCHS,
                                  on_run=lambda label, seed: calls.append((label, seed)))
    finally:
        torch.set_num_threads(threads)
    return result, data, calls


def ablation_run(variant: dict, seed: int) -> Path:
    return Path(variant["runs"][str(seed)])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_variants_differ_only_in_the_ablated_model_argument(tiny):
    result, data, _ = tiny
    variants = result["variants"]
    assert set(variants) == {"design", "relu6", "expansion", "none"}
    ablated = {"design": set(), "relu6": {"model.kwargs.bottleneck_act"}, "expansion": {"model.kwargs.shortcut"},
               "none": {"model.kwargs.shortcut"}}
    for seed in SEEDS:
        configs = {name: _flat(yaml.safe_load((ablation_run(v, seed) / "config.yaml").read_text()))
                   for name, v in variants.items()}
        design = configs["design"]
        assert design["train.seed"] == seed and design["train.epochs"] == EPOCHS
        assert design["data.root"] == str(data.resolve())
        assert (design["model.width"], design["data.resolution"]) == (0.35, 32)
        for name, cfg in configs.items():
            assert cfg.keys() == design.keys()
            assert {k for k in cfg if cfg[k] != design[k]} == ablated[name], name
            assert {k: cfg[f"model.kwargs.{k}"] for k in ("bottleneck_act", "shortcut")} == variants[name]["kwargs"]


def test_the_model_arguments_reach_the_trained_models(tiny):
    result, _, _ = tiny
    for name, v in result["variants"].items():
        model, config = load_model(ablation_run(v, SEEDS[0]) / "best.safetensors")
        assert {k: config["model_kwargs"][k] for k in v["kwargs"]} == v["kwargs"]
        assert model.shortcut == v["kwargs"]["shortcut"]
        relu6 = [isinstance(b.project.act, torch.nn.ReLU6) for b in model.blocks]
        assert all(relu6) if v["kwargs"]["bottleneck_act"] == "relu6" else not any(relu6)
        residual = [b.use_residual for b in model.blocks]
        assert any(residual) == (name in ("design", "relu6"))
        assert len(model.shortcut_blocks) == (0 if name == "none" else 10)


def test_curves_one_value_per_epoch_read_from_the_runs(tiny):
    result, _, calls = tiny
    labels = [v["label"] for v in result["variants"].values()]
    assert calls == [(label, seed) for seed in SEEDS for label in labels]  # each variant trained once per seed
    for v in result["variants"].values():
        assert set(v["curves"]) == set(v["final"]) == {str(s) for s in SEEDS}
        for seed, curve in v["curves"].items():
            assert len(curve) == EPOCHS and all(0 <= x <= 1 for x in curve)
            evals = [json.loads(line) for line in (ablation_run(v, int(seed)) / "metrics.jsonl").read_text()
                     .splitlines() if json.loads(line)["kind"] == "eval"]
            assert curve == [r["model/top1"] for r in evals]
            assert v["final"][seed] == curve[-1]
        finals = list(v["final"].values())
        assert (v["min"], v["max"]) == (min(finals), max(finals))
        assert v["mean"] == pytest.approx(sum(finals) / len(finals))
    assert result["settings"]["seeds"] == SEEDS and result["settings"]["epochs"] == EPOCHS
    assert "16 val images" in result["data"] and "8 classes" in result["data"]
    assert set(result["ablations"]) == {"6a", "6b"}
    assert result["ablations"]["6b"]["variants"] == ["design", "expansion", "none"]
    assert json.loads(json.dumps(result)) == result  # JSON-serialisable, and unchanged by a round trip


def test_draw_writes_both_figures(tiny, tmp_path):
    paths = ablation.draw(tiny[0], tmp_path)
    assert [p.name for p in paths] == ["fig6a.png", "fig6b.png"]
    for p in paths:
        assert p.stat().st_size > 1000
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_bad_budget_seeds_and_data_rejected_before_any_work(tmp_path):
    with pytest.raises(UserError, match="unknown ablation budget 'huge'"):
        ablation.run("huge", work_dir=tmp_path)
    with pytest.raises(UserError, match="at least one seed"):
        ablation.run("quick", work_dir=tmp_path, seeds=[])
    with pytest.raises(UserError, match="train/ and val/"):
        ablation.run("quick", tmp_path / "missing", work_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # checked before anything is written


def test_budgets_name_their_settings():
    assert set(ablation.BUDGETS) >= {"quick", "full"}
    quick, full = ablation.BUDGETS["quick"], ablation.BUDGETS["full"]
    assert quick["data"] == {"images": 2400, "size": 64}  # the embedded demo set: 1920 train / 480 val at 64 px
    assert len(full["seeds"]) == 3 and full["epochs"] > quick["epochs"]
    assert full["data"]["images"] * full["data"]["size"] ** 2 > quick["data"]["images"] * quick["data"]["size"] ** 2


# ---- verdicts on hand-made results -----------------------------------------------------------------------------------

def _variant(label: str, *finals: float) -> dict:
    final = {str(i): f for i, f in enumerate(finals)}
    return {"label": label, "final": final, "mean": sum(finals) / len(finals), "min": min(finals), "max": max(finals)}


def _judge(**finals) -> dict:
    variants = {name: _variant(name.upper(), *f) for name, f in finals.items()}
    return ablation.verdict(variants, list(finals), "a", "A beats the rest")


def test_verdict_held_and_separable():
    v = _judge(a=(0.80, 0.82), b=(0.70, 0.75), c=(0.60, 0.65))
    assert v["held"] is True and v["separable"] == {"b": True, "c": True}
    assert "held on this proxy" in v["sentence"] and "not separable" not in v["sentence"]
    assert "A 0.810 (0.800-0.820)" in v["sentence"] and "B 0.725 (0.700-0.750)" in v["sentence"]
    assert "2 seeds" in v["sentence"]


def test_verdict_highest_mean_but_overlapping_spreads_is_not_separable():
    v = _judge(a=(0.70, 0.90), b=(0.75, 0.78), c=(0.50, 0.55))
    assert v["held"] is True and v["separable"] == {"b": False, "c": True}
    assert "not separable" in v["sentence"] and "overlaps that of B" in v["sentence"]
    assert "held on this proxy:" not in v["sentence"]  # never the unqualified claim


def test_verdict_touching_spreads_count_as_overlap():
    v = _judge(a=(0.75, 0.85), b=(0.70, 0.75))  # the preferred variant's min equals the other's max
    assert v["held"] is True and v["separable"] == {"b": False}
    assert "not separable" in v["sentence"]


def test_verdict_not_held():
    v = _judge(a=(0.60, 0.62), b=(0.70, 0.72), c=(0.61, 0.70))
    assert v["held"] is False
    assert "did not hold" in v["sentence"] and "B separably so" in v["sentence"]
    overlapping = _judge(a=(0.60, 0.70), b=(0.66, 0.68))
    assert overlapping["held"] is False and "not separable" in overlapping["sentence"]
    tie = _judge(a=(0.70, 0.70), b=(0.70, 0.70))
    assert tie["held"] is False  # the highest mean must be the preferred variant's alone


def test_verdict_one_seed_and_missing_runs():
    one = _judge(a=(0.8,), b=(0.7,))
    assert one["held"] is True and "1 seed:" in one["sentence"] and "no spread was measured" in one["sentence"]
    missing = ablation.verdict({"a": _variant("A", 0.8)}, ["a", "b"], "a", "A beats B")
    assert missing["held"] is None and "Not measured" in missing["sentence"]


def test_draw_from_a_hand_made_result_reloaded_from_json(tmp_path):
    curves = {"0": [0.2, 0.4, 0.5], "1": [0.3, 0.5, 0.6]}
    variants = {n: {"label": n, "kwargs": {}, "curves": curves, "final": {}, "mean": 0, "min": 0, "max": 0}
                for n in ablation.VARIANTS}
    result = {"data": "hand-made", "settings": {"seeds": [0, 1]}, "variants": variants,
              "ablations": {k: {"variants": a["variants"], "title": a["title"]} for k, a in ablation.ABLATIONS.items()}}
    paths = ablation.draw(json.loads(json.dumps(result)), tmp_path / "figs")
    assert [p.name for p in paths] == ["fig6a.png", "fig6b.png"] and all(p.stat().st_size > 1000 for p in paths)
