"""torchvision MobileNetV2 weights -> ours -> torchvision: same outputs, width and classes read from the shapes."""

import pytest
import torch
import torchvision
from _interop_helpers import assert_same_outputs, randomise_bn

from mnv2.errors import UserError
from mnv2.interop import from_torchvision, to_torchvision
from mnv2.models import create_model


def _reference(width: float, num_classes: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    return randomise_bn(torchvision.models.mobilenet_v2(width_mult=width, num_classes=num_classes), seed)


@pytest.mark.parametrize("width, num_classes", [(0.35, 1000), (0.75, 10), (1.0, 1000), (1.4, 1000)])
def test_outputs_match_torchvision(width, num_classes):
    ref = _reference(width, num_classes)
    imported = from_torchvision(ref.state_dict())
    assert imported.model_kwargs == {"width_mult": width, "num_classes": num_classes}
    assert not imported.model.training
    assert_same_outputs(ref, imported.model)


def test_round_trip_back_to_torchvision():
    ref = _reference(0.5, seed=1)
    state = to_torchvision(from_torchvision(ref.state_dict()).model)
    assert state.keys() == ref.state_dict().keys()
    back = torchvision.models.mobilenet_v2(width_mult=0.5)
    back.load_state_dict(state)  # strict: every key and shape fits
    back.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(back(x), ref(x))


def test_preprocess_record_is_torchvision_v1_evaluation():
    transforms = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    record = from_torchvision(_reference(1.0).state_dict()).preprocess
    assert record["mean"] == list(transforms.mean) and record["std"] == list(transforms.std)
    assert record["resolution"] == transforms.crop_size[0]
    assert record["resolution"] / record["crop_fraction"] == pytest.approx(transforms.resize_size[0])
    assert record["interpolation"] == transforms.interpolation.value


def test_shape_mismatch_names_the_key_and_both_shapes():
    state = _reference(1.0).state_dict()
    state["features.5.conv.1.0.weight"] = torch.zeros(144, 1, 3, 3)
    with pytest.raises(UserError) as err:
        from_torchvision(state, origin="weights.pth")
    message = str(err.value)
    assert "weights.pth" in message and "'features.5.conv.1.0.weight'" in message
    assert "(144, 1, 3, 3)" in message and "(192, 1, 3, 3)" in message


def test_missing_and_extra_keys_are_named():
    state = _reference(1.0).state_dict()
    missing = dict(state)
    del missing["features.9.conv.3.running_var"]
    with pytest.raises(UserError, match=r"lack key 'features\.9\.conv\.3\.running_var'"):
        from_torchvision(missing)
    extra = dict(state) | {"features.19.0.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"key 'features\.19\.0\.weight' that MobileNetV2"):
        from_torchvision(extra)


def test_unknown_width_and_foreign_layout_are_refused():
    with pytest.raises(UserError, match="stem=24, first block=16, last block=192"):
        from_torchvision(torchvision.models.mobilenet_v2(width_mult=0.6).state_dict())
    with pytest.raises(UserError, match="not a torchvision MobileNetV2 state dict.*looks like mnv2 weights"):
        from_torchvision(create_model("mobilenet_v2").state_dict())


def test_models_torchvision_cannot_reproduce_are_refused():
    with pytest.raises(UserError, match="padding"):
        to_torchvision(create_model("mobilenet_v2", width_mult=0.35, padding="tf", bn_eps=1e-3))
    with pytest.raises(UserError, match="output stride 16"):
        to_torchvision(create_model("mobilenet_v2", width_mult=0.35, output_stride=16))
