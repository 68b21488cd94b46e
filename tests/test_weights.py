"""Weights files (mnv2.weights): the readable `.json` beside a weights file never describes other weights, whatever
write a crash interrupts."""

import json

import pytest
import torch

import mnv2.weights
from mnv2 import create_model
from mnv2.weights import config_copy_path, read_weights, restore_config_copy, save_model


class Crash(Exception):
    """The process dying at this point."""


def save(path, seed: int):
    torch.manual_seed(seed)
    model = create_model("mobilenet_v2", width_mult=0.35, num_classes=3)
    save_model(path, model, "mobilenet_v2", {"width_mult": 0.35, "num_classes": 3}, epoch=seed)
    return model


def crash(*args, **kwargs):
    raise Crash


def consistent(path, epoch: int, model) -> None:
    """`path` holds `model`'s weights with `epoch` in its header, and its .json (if any) says the same."""
    state, header = read_weights(path)
    assert header["epoch"] == epoch
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    if config_copy_path(path).exists():
        assert json.loads(config_copy_path(path).read_text()) == header


@pytest.mark.parametrize("write", ["_write_config_copy", "save_file"])
def test_a_crash_in_either_write_leaves_weights_and_json_agreeing(tmp_path, monkeypatch, write):
    path = tmp_path / "best.safetensors"
    first = save(path, 1)
    consistent(path, 1, first)
    assert config_copy_path(path).exists()
    monkeypatch.setattr(mnv2.weights, write, crash)
    with pytest.raises(Crash):
        save(path, 2)
    if write == "save_file":  # the old weights stay
        consistent(path, 1, first)
    else:  # the new weights are in place, their copy not yet
        torch.manual_seed(2)
        second = create_model("mobilenet_v2", width_mult=0.35, num_classes=3)
        consistent(path, 2, second)
    assert not config_copy_path(path).exists()  # never the other weights' copy
    monkeypatch.undo()
    assert restore_config_copy(path) and not restore_config_copy(path)
    assert json.loads(config_copy_path(path).read_text()) == read_weights(path)[1]
