"""nn.Modules only: they return tensors, never losses or post-processed results."""

from .blocks import ConvBNAct, InvertedResidual, make_divisible
from .deeplab import DeepLabV3
from .features import FeatureTap
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import TABLE_2, MobileNetV2
from .registry import create_model, list_models, register_model
from .ssdlite import SSDLite

__all__ = [
           "TABLE_2",
           "ConvBNAct",
           "DeepLabV3",
           "FeatureTap",
           "InvertedResidual",
           "MobileNetV1",
           "MobileNetV2",
           "SSDLite",
           "create_model",
           "list_models",
           "make_divisible",
           "register_model",
]
