"""What every weight importer shares: the result type, width inference, preprocessing records and the renaming load.

An importer turns another library's MobileNetV2 weights into our `MobileNetV2` by renaming keys (and, for Keras,
transposing kernels); it never changes the function the weights compute. Width and class count are not stored in a
state dict, so they are read back from the tensor shapes.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models import TABLE_2, MobileNetV2, make_divisible
from ..models.mobilenetv2 import HEAD_CHANNELS, STEM_CHANNELS
from ..weights import load_state_dict_strict, save_model

# The width multipliers with published weights (paper Figure 5; Keras and timm release the same set, torchvision 1.0).
WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def preprocess_record(mean: list[float], std: list[float], resolution: int = 224, crop_fraction: float = 0.875,
                      interpolation: str = "bilinear", resize: str = "crop") -> dict:
    """The evaluation preprocessing a set of weights was trained for, in [0, 1] pixel units: resize the short side to
    resolution / crop_fraction, centre-crop `resolution` (resize "crop"), or resize the whole image to `resolution`
    squared, aspect not kept (resize "squash", as Keras' `load_img`); then (x - mean) / std."""
    record = {"mean": list(mean), "std": list(std), "resolution": resolution, "crop_fraction": crop_fraction,
              "interpolation": interpolation}
    return record if resize == "crop" else {**record, "resize": resize}  # "crop" records read as they always did


@dataclass
class Imported:
    """An imported model with what is needed to use and save it.

    `model` is in eval mode; `model_kwargs` rebuild it with `mnv2.create_model(model_name, **model_kwargs)`;
    `preprocess` is the record of `preprocess_record`; `source` names the library the weights came from; `output`
    the activation that turns the logits into the original model's outputs ("softmax", "sigmoid" or "linear"; None:
    not recorded, read as softmax); `class_names` the classes in output order, when known.
    """

    model: MobileNetV2
    model_kwargs: dict
    preprocess: dict
    source: str
    model_name: str = field(default="mobilenet_v2")
    output: str | None = None
    class_names: list[str] | None = None

    def save(self, path: str | Path) -> Path:
        """Write a self-describing `.safetensors` file (see `mnv2.weights.save_model`)."""
        meta = {"output": self.output, "class_names": self.class_names}
        return save_model(path, self.model, self.model_name, self.model_kwargs, preprocess=self.preprocess,
                          source=self.source, **{k: v for k, v in meta.items() if v is not None})


def width_signature(width: float) -> tuple[int, int, int]:
    """(stem, first block, last block) output channels of MobileNetV2 at `width`: together they tell the published
    widths apart (0.35 and 0.5 share the first two; 1.3 and 1.4 differ in all three)."""
    first, last = TABLE_2[0][1], TABLE_2[-1][1]
    return make_divisible(STEM_CHANNELS * width), make_divisible(first * width), make_divisible(last * width)


def channel_counts(width: float) -> tuple[int, ...]:
    """Output channels of the stem, of each Table 2 stage and of the last 1x1 conv at `width`. They fix every layer
    of the network (an expansion is t times its block's input)."""
    stages = (make_divisible(c * width) for _, c, _, _ in TABLE_2)
    return (make_divisible(STEM_CHANNELS * width), *stages, make_divisible(HEAD_CHANNELS * max(1.0, width)))


def infer_width(stem: int, first: int, last: int, origin: str, counts: tuple[int, ...] | None = None,
                prefer: float | None = None) -> float:
    """The width multiplier whose channel counts are (stem, first, last), or a UserError naming what was found.

    Three counts tell the published widths apart but cannot vouch for the stages between them, so without `counts`
    only the published widths are accepted. Given every count (`channel_counts` order), any width that reproduces
    them is: `prefer` (e.g. the alpha a Keras config names) when it does, else a published width, else the shortest
    decimal in (0, 4] that does. (Keras rounds int(c * alpha) where we round c * alpha, so for a few alphas the two
    differ by 8 channels in one stage; a nearby width then builds Keras' exact network.)
    """
    def fits(width: float) -> bool:
        if counts is not None:
            return channel_counts(width) == tuple(counts)
        return width_signature(width) == (stem, first, last)

    for width in ([prefer] if prefer else []) + list(WIDTHS):
        if fits(width):
            return width
    if counts is not None:
        for steps in (10, 100, 1000):
            width = next((i / steps for i in range(1, 4 * steps + 1) if fits(i / steps)), None)
            if width is not None:
                return width
        raise UserError(f"{origin}: channel counts {list(counts)} (stem, the seven stages of Table 2, last conv) "
                        "match no MobileNetV2 width multiplier")
    known = ", ".join(f"{w:g}" for w in WIDTHS)
    raise UserError(f"{origin}: channel counts stem={stem}, first block={first}, last block={last} match no "
                    f"MobileNetV2 width multiplier ({known})")


def require(state: Mapping, key: str, origin: str, library: str) -> torch.Tensor:
    """`state[key]`, or a UserError saying the weights are not `library`'s MobileNetV2."""
    if key not in state:
        raise UserError(f"{origin}: not a {library} MobileNetV2 state dict (no key {key!r}){_hint(state, library)}")
    return state[key]


def _hint(state: Mapping, library: str) -> str:
    guesses = {"torchvision": "features.0.0.weight", "timm": "conv_stem.weight", "mnv2": "stem.conv.weight"}
    for name, key in guesses.items():
        if name != library and key in state:
            return f"; it looks like {name} weights" + ("" if name == "mnv2" else f" (use --from {name})")
    return ""


def load_renamed(model: nn.Module, state: Mapping[str, torch.Tensor], source_key: Callable[[str], str | None],
                 origin: str, convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Load `state` (keyed the other library's way) into `model`.

    `source_key(our_key)` names the other library's key for each of ours (None: the other library has no such
    tensor, keep ours, e.g. Keras has no `num_batches_tracked`); `convert(our_key, tensor)` turns a tensor into our
    layout. Every key of `state` must be used, and every shape must fit; errors name the other library's key.
    """
    renamed, names = {}, {}
    for key, own in model.state_dict().items():
        theirs = source_key(key)
        if theirs is None:
            renamed[key] = own
            continue
        names[key] = theirs
        if theirs in state:
            value = torch.as_tensor(state[theirs])
            renamed[key] = convert(key, value) if convert is not None else value
    used = set(names.values())
    unused = [k for k in state if k not in used]
    if unused:
        raise UserError(f"{origin}: weights have key {unused[0]!r} that MobileNetV2 "
                        f"(width {model.width_mult:g}, {model.num_classes} classes) does not have")
    load_state_dict_strict(model, renamed, source=origin, key_names=names)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict from a `.pth`/`.pt` file (loaded with `weights_only=True`: no pickled code runs) or a
    `.safetensors` file. A training checkpoint holding it under "state_dict" or "model" is unwrapped, and the
    "module." prefix of DistributedDataParallel is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such state dict file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{path}: not a readable PyTorch state dict file (corrupt, or it holds Python objects "
                            "besides tensors, which are not loaded because unpickling them could run code)") from None
        except EOFError:
            raise UserError(f"{path}: not a readable PyTorch state dict file (empty or truncated)") from None
        except (RuntimeError, ValueError, OSError) as e:
            reason = str(e).split(". ")[0]
            raise UserError(f"{path}: not a readable PyTorch state dict file ({reason})") from None
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: does not hold a state dict (a non-empty mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
