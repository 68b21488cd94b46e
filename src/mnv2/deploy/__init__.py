"""Deployment: BN folding, the section 5.1 t-split executor, ONNX export, int8 quantisation, inference backends.

Export, quantisation and the runtimes import the optional packages (onnx, onnxruntime, openvino) only when used.
"""

from .export import ExportReport, export_onnx, load_source
from .fold import fold_bn
from .preprocess import Preprocess
from .quantize import Agreement, quantize_int8, top1_agreement
from .runtime import BACKENDS, Prediction, Predictor, default_backend
from .tsplit import tsplit

__all__ = ["BACKENDS", "Agreement", "ExportReport", "Prediction", "Predictor", "Preprocess", "default_backend",
           "export_onnx", "fold_bn", "load_source", "quantize_int8", "top1_agreement", "tsplit"]
