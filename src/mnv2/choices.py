"""Values the command line offers as choices and defaults, defined in a module without torch so that building the
parser (`mnv2 --help`) does not import it; the modules that implement them import them from here."""

MIN_OPSET = 17  # ONNX export (deploy/export.py)
DEFAULT_OPSET = 18

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # int8 activation ranges (deploy/quantize.py)
DEFAULT_METHOD = "percentile"  # measured best of the three; see docs/deploy.md

# Inference backends (deploy/runtime.py).
BACKENDS = ("torch", "torch-fast", "torch-compile", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8")
