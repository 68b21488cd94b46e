"""Deployment: BN folding, the section 5.1 t-split executor, ONNX export, int8 quantisation, inference backends."""

from .fold import fold_bn

__all__ = ["fold_bn"]

# Export, quantisation and runtimes import lazily-optional packages (onnx, onnxruntime, openvino) only when used.
from .export import ExportReport, export_onnx, load_source
from .preprocess import Preprocess
from .quantize import Agreement, quantize_int8, top1_agreement
from .runtime import BACKENDS, Prediction, Predictor, default_backend

__all__ += ["BACKENDS", "Agreement", "ExportReport", "Prediction", "Predictor", "Preprocess", "default_backend",
            "export_onnx", "load_source", "quantize_int8", "top1_agreement"]

# Paper section 5.1: the t-way split executor.
from .tsplit import tsplit

__all__ += ["tsplit"]
