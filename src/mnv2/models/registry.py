"""Model names -> builders. Builders take keyword arguments only; the registry knows nothing of any model's insides."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UserError
from .deeplab import deeplabv3_mobilenet_v1, deeplabv3_mobilenet_v2
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import MobileNetV2
from .shufflenet import shufflenet_v1
from .ssdlite import SSDLite

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register `builder` under `name` (usable as a decorator)."""
    def add(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn
    return add(builder) if builder is not None else add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. `create_model("mobilenet_v2", width_mult=0.35, num_classes=10)`."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    try:
        return builder(**kwargs)
    except TypeError as e:  # an unknown keyword argument
        raise UserError(f"model {name!r}: {e}") from None


register_model("mobilenet_v2", MobileNetV2)
register_model("mobilenet_v1", MobileNetV1)
register_model("shufflenet_v1", shufflenet_v1)  # ShuffleNet 2x, g=3 by default (paper Tables 3, 4)
register_model("ssdlite_mobilenet_v2", SSDLite)  # paper section 6.2, Tables 5-6
register_model("deeplabv3_mobilenet_v2", deeplabv3_mobilenet_v2)  # paper section 6.3, Table 7 (MNet V2*)
register_model("deeplabv3_mobilenet_v1", deeplabv3_mobilenet_v1)  # Table 7's MNet V1 rows
