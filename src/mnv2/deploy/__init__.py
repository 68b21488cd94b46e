"""Deployment: BN folding, the section 5.1 t-split executor, ONNX export, int8 quantisation, inference backends."""

from .fold import fold_bn
from .tsplit import tsplit

__all__ = ["fold_bn", "tsplit"]
