"""Deployment: BN folding, the section 5.1 t-split executor, ONNX export, int8 quantisation, inference backends."""

from .fold import fold_bn

__all__ = ["fold_bn"]
