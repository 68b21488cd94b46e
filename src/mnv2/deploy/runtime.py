"""Inference backends behind one interface, and `Predictor`: images in, top-k (label, name, probability) out.

Backends (all take a float32 NCHW batch, but an exported detector's graph, which takes uint8 pixels [N, R, R, 3]:
`input_dtype` says which; `outputs(x)` returns every output of the model, calling one returns the first, a
classifier's logits; a detector's outputs are turned into boxes by mnv2.deploy.detect, a segmentation
model's per-pixel logits into masks by mnv2.deploy.segment):
  torch            eager PyTorch, the reference.
  torch-fast       BN folded (section 3: conv + BN become one conv), channels_last, still eager; a MobileNetV2 runs
                   on the native bottleneck kernels of the section 5.1 executor at t = 1 where they build.
  torch-compile    the folded channels_last model through torch.compile with weight freezing: compiling takes tens
                   of seconds, so it is opt-in (long-running services, benchmarks).
  onnxruntime      the folded graph exported to ONNX (mnv2.deploy.export) on onnxruntime's CPU provider.
  onnxruntime-int8 the same graph quantised to int8 QDQ (mnv2.deploy.quantize); needs calibration images or an int8
                   .onnx written by `mnv2 export --int8`.
  openvino         the ONNX graph on OpenVINO's CPU plugin, fp32 requested explicitly (its default here is bf16).
  openvino-int8    the int8 QDQ graph of onnxruntime-int8 on OpenVINO, which turns the QDQ pairs into its own int8
                   kernels; the same .onnx file runs on either runtime, with the same calibration.
The default is onnxruntime, else openvino (the two fp32 graph runtimes, within ~15% of each other), else torch-fast
(1.4-3x slower than either); for an int8 .onnx file openvino-int8, else onnxruntime-int8 (BENCHMARKS.md "Inference",
written by benchmarks/inference.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .. import native
from ..choices import BACKENDS
from ..errors import UserError
from .export import (
    META_CLASSES,
    META_INT8,
    META_OUTPUT,
    META_PREPROCESS,
    META_TASK,
    SEGMENTATION,
    load_source,
    optional_import,
    read_metadata,
    to_onnx,
)
from .export_detection import DETECTION_OUTPUTS, PIXELS_NAME, RAW_OUTPUTS
from .fold import fold_bn
from .preprocess import Preprocess, resolve_class_names

INT8_BACKENDS = ("openvino-int8", "onnxruntime-int8")  # fastest first (BENCHMARKS.md)
ONNX_BACKENDS = ("onnxruntime", "openvino", *INT8_BACKENDS)
_EXTRA = {"onnxruntime": ("onnxruntime", "export"), "onnxruntime-int8": ("onnxruntime", "export"),
          "openvino": ("openvino", "openvino"), "openvino-int8": ("openvino", "openvino")}
_DEFAULT_ORDER = ("onnxruntime", "openvino", "torch-fast")


def is_installed(backend: str) -> bool:
    if backend not in _EXTRA:
        return True
    try:
        optional_import(*_EXTRA[backend], backend)
    except UserError:
        return False
    # int8 graphs are written by onnxruntime's quantiser, whichever runtime runs them
    return backend not in INT8_BACKENDS or is_installed("onnxruntime")


def default_backend(int8: bool = False) -> str:
    if int8:
        return next((b for b in INT8_BACKENDS if is_installed(b)), INT8_BACKENDS[-1])
    return next(b for b in _DEFAULT_ORDER if is_installed(b))


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name in _EXTRA:
        module, extra = _EXTRA[name]
        optional_import(module, extra, f"backend {name!r}")


# --- backends: callables numpy [N, 3, H, W] float32 -> numpy logits [N, C]; outputs(x) -> every output ------------

class TorchBackend:
    input_dtype = np.dtype(np.float32)

    def __init__(self, model: nn.Module, threads: int | None = None, channels_last: bool = False,
                 compile: bool = False):
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: PyTorch has one intra-op pool
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.eval().to(memory_format=self.memory_format)
        self.model = torch.compile(model, options={"freezing": True}) if compile else model

    @torch.inference_mode()
    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        t = torch.from_numpy(x).contiguous(memory_format=self.memory_format)
        out = self.model(t)
        return [o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]


class OnnxRuntimeBackend:
    def __init__(self, onnx_model: bytes | str | Path, threads: int | None = None):
        ort = optional_import("onnxruntime", "export", "backend 'onnxruntime'")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        source = str(onnx_model) if isinstance(onnx_model, (str, Path)) else onnx_model
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime's errors (Fail, InvalidGraph, InvalidProtobuf,
            # NoSuchFile, ...) are pybind11 classes deriving from Exception itself: no narrower base catches them all
            raise UserError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = np.dtype(np.uint8 if first.type == "tensor(uint8)" else np.float32)

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)})

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]


class OpenVinoBackend:
    """The ONNX graph compiled by OpenVINO's CPU plugin once per input shape.

    A graph with a dynamic batch dimension runs on the plugin's dynamic-shape path, which at batch 1 is 7% (int8) to
    12% (fp32) slower than the same graph compiled for a static shape (docs/deploy.md). Compiling takes 0.1-0.4 s,
    so the batch-1 shape is compiled up front and the last few shapes seen are kept.

    A graph whose height and width are free (a segmentation model run at each image's size) is compiled once with
    its dynamic shape instead: images come in many sizes (VOC val: hundreds), and a compile per size costs more than
    the dynamic path loses (DeepLabv3 0.35 at 500 x 375, one thread: 0.10-0.15 s to compile a shape, 8.0-9.3 ms per
    call static, 8.3-10.3 ms dynamic).
    """

    SHAPES_KEPT = 4

    def __init__(self, onnx_model: bytes | str | Path, threads: int | None = None, precision: str = "f32"):
        ov = optional_import("openvino", "openvino", "backend 'openvino'")
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = threads
        with tempfile.TemporaryDirectory(prefix="mnv2-ov-") as work:
            path = Path(onnx_model) if isinstance(onnx_model, (str, Path)) else Path(work) / "model.onnx"
            if not isinstance(onnx_model, (str, Path)):
                path.write_bytes(onnx_model)
            try:
                self.model = self.core.read_model(str(path))
            except RuntimeError as e:  # OpenVINO's C++ exceptions arrive as RuntimeError
                raise UserError(f"OpenVINO cannot load the model: {str(e).splitlines()[0]}") from None
        self.requests: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.input_dtype = np.dtype(np.uint8 if self.model.inputs[0].get_element_type() == ov.Type.u8 else np.float32)
        dims = list(self.model.inputs[0].get_partial_shape())
        self.dynamic_request = None
        if len(dims) == 4 and any(d.is_dynamic for d in dims[2:]):  # free height and width: one dynamic compile
            try:
                self.dynamic_request = self.core.compile_model(self.model, "CPU", self.config).create_infer_request()
            except RuntimeError as e:  # OpenVINO's C++ exceptions arrive as RuntimeError
                raise UserError(f"OpenVINO cannot compile the model: {str(e).splitlines()[0]}") from None
        elif all(d.is_static for d in dims[1:]):  # compile now, so that a graph OpenVINO cannot run fails here
            self._request((dims[0].get_length() if dims[0].is_static else 1, *(d.get_length() for d in dims[1:])))

    def _request(self, shape: tuple[int, ...]):
        request = self.requests.get(shape)
        if request is not None:
            self.requests.move_to_end(shape)
            return request
        model = self.model.clone()
        try:
            model.reshape(list(shape))
            request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        except RuntimeError as e:  # OpenVINO's C++ exceptions arrive as RuntimeError
            raise UserError(f"OpenVINO cannot run the model on input {list(shape)}: {str(e).splitlines()[0]}"
                            ) from None
        self.requests[shape] = request
        if len(self.requests) > self.SHAPES_KEPT:
            self.requests.popitem(last=False)
        return request

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        # share_inputs: OpenVINO reads the caller's array instead of copying it (~0.1 ms of a 1.5 ms int8 call);
        # share_outputs: its output buffer is reused by the next call, so the outputs are copied out.
        request = self.dynamic_request if self.dynamic_request is not None else self._request(x.shape)
        out = request.infer({0: x}, share_inputs=True, share_outputs=True)
        return [np.array(out[i], copy=True) for i in range(len(self.model.outputs))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]


def fast_module(model: nn.Module) -> nn.Module:
    """torch-fast's module: for a MobileNetV2, where the native kernels build, the section 5.1 executor at t = 1 --
    one call per bottleneck, expansion, depthwise and projection fused (mnv2.deploy.tsplit); at 1.0 @224, batch 1,
    2 threads 7.0 vs 9.5 ms for the folded channels_last model, the same at batch 32. Otherwise the folded model."""
    from ..models.mobilenetv2 import MobileNetV2
    from .tsplit import tsplit
    # the split executor's head averages: a max-pooling model (a Keras import) keeps the folded model
    if (isinstance(model, MobileNetV2) and model.shortcut != "expansion"
            and isinstance(model.pool, nn.AdaptiveAvgPool2d) and native.available()):
        return tsplit(model, 1)
    return fold_bn(model)


def build_backend(name: str, model: nn.Module, resolution: int, threads: int | None = None,
                  calibration: Callable[[], object] | None = None, graph: Callable[[], bytes] | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Backend `name` for a PyTorch model. `calibration()` returns a CalibrationReader (int8 backends only);
    `graph()` the fp32 ONNX graph the ONNX backends run (default: the model's own, dynamic batch)."""
    _check_backend(name)
    model = model.eval()
    if name == "torch":
        return TorchBackend(model, threads)
    if name == "torch-fast":
        return TorchBackend(fast_module(model), threads, channels_last=True)
    if name == "torch-compile":
        return TorchBackend(fold_bn(model), threads, channels_last=True, compile=True)
    fp32 = graph() if graph is not None else to_onnx(model, resolution, dynamic_batch=True).SerializeToString()
    if name == "onnxruntime":
        return OnnxRuntimeBackend(fp32, threads)
    if name == "openvino":
        return OpenVinoBackend(fp32, threads)
    if calibration is None:
        raise UserError(f"backend {name!r} needs calibration images, or an int8 .onnx file written by "
                        "`mnv2 export --int8`")
    from .quantize import quantize_int8
    with tempfile.TemporaryDirectory(prefix="mnv2-int8-") as work:
        int8 = quantize_int8(fp32, Path(work) / "int8.onnx", calibration()).read_bytes()
    return OpenVinoBackend(int8, threads) if name == "openvino-int8" else OnnxRuntimeBackend(int8, threads)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside the block, for its work beside an onnxruntime / OpenVINO backend: the runtime's and
    torch's thread pools each spin on for a while after their work, and on a 2-core machine they took the cores from
    each other (SSDLite @ 320 end to end, 2 threads: 38 ms with torch at 2 threads around it, 19 ms at 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- the predictor -------------------------------------------------------------------------------------------------

class Prediction(NamedTuple):
    label: int
    name: str
    prob: float


OUTPUTS = ("softmax", "sigmoid", "linear")


def class_probabilities(logits: np.ndarray, output: str = "softmax") -> np.ndarray:
    """A classifier's outputs from its logits, as the model was trained to give them (the weights' "output"):
    softmax over the classes (mnv2's own models, torchvision, timm), an independent sigmoid per class (multi-label
    and one-unit binary Keras heads), or the logits themselves (a Keras head without activation)."""
    if output == "sigmoid":
        return np.exp(-np.logaddexp(0, -logits))  # 1 / (1 + e^-x) without overflowing for very negative x
    if output == "linear":
        return logits
    z = logits - logits.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


class Predictor:
    """Load -> preprocess -> run -> postprocess, the same for every backend.

    >>> p = Predictor.from_weights("best.safetensors", backend="onnxruntime", threads=2)
    >>> p.predict(["cat.jpg"], topk=3)   # [[Prediction(label=281, name='tabby', prob=0.62), ...]]
    """

    def __init__(self, backend: Callable[[np.ndarray], np.ndarray], backend_name: str, preprocess: Preprocess,
                 class_names: Sequence[str], batch_size: int = 8, fixed_batch: int | None = None,
                 output: str = "softmax"):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if output not in OUTPUTS:
            raise UserError(f"unknown output activation {output!r}; expected one of {', '.join(OUTPUTS)}")
        self.output = output
        self.backend, self.backend_name = backend, backend_name
        self.preprocess, self.class_names = preprocess, list(class_names)
        # A graph exported without --dynamic-batch accepts exactly its own batch size.
        self.batch_size = fixed_batch or batch_size
        self.fixed_batch = fixed_batch

    # construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, config: dict, backend: str | None = None, threads: int | None = None,
                   batch_size: int = 8, resolution: int | None = None, calib_images: list | None = None
                   ) -> Predictor:
        """A predictor for a PyTorch model and its config (as stored by `mnv2.weights.save_model`)."""
        if config.get("task") == SEGMENTATION:
            raise UserError("a segmentation model; run it with SegmentationPredictor (`mnv2 predict` does)")
        name = backend or default_backend()
        preprocess = Preprocess.from_dict(config.get("preprocess"), resolution)
        with torch.inference_mode():
            num_classes = int(model.eval()(torch.zeros(1, 3, preprocess.resolution, preprocess.resolution)).shape[1])
        names = resolve_class_names(config.get("class_names"), num_classes)
        calibration = None
        if calib_images:
            from .quantize import CalibrationReader
            calibration = lambda: CalibrationReader.from_images(calib_images, preprocess)
        runner = build_backend(name, model, preprocess.resolution, threads, calibration)
        return cls(runner, name, preprocess, names, batch_size, output=config.get("output", "softmax"))

    @classmethod
    def from_weights(cls, path: str | Path, **kwargs) -> Predictor:
        return cls.from_model(*load_source(weights=path), **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> Predictor:
        return cls.from_model(*load_source(run=run_dir), **kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path, backend: str | None = None, threads: int | None = None,
                  batch_size: int = 8) -> Predictor:
        """A predictor for an .onnx classifier; preprocessing and class names come from its metadata_props."""
        proto, meta, (batch, height, width), num_classes = inspect_onnx(path)
        if meta.get(META_TASK) == "detection":
            raise UserError(f"{path}: a detector; run it with DetectionPredictor.from_onnx (`mnv2 predict` does)")
        if meta.get(META_TASK) == SEGMENTATION:
            raise UserError(f"{path}: a segmentation model; run it with SegmentationPredictor.from_onnx (`mnv2 "
                            "predict` does)")
        name = onnx_backend_name(path, meta, backend)
        if META_PREPROCESS in meta:
            preprocess = Preprocess.from_dict(meta[META_PREPROCESS])
            if preprocess.resolution not in (height, None) or preprocess.resolution not in (width, None):
                raise UserError(f"{path}: metadata says input {preprocess.resolution}x{preprocess.resolution} but the "
                                f"graph takes {height}x{width}")
        elif isinstance(height, int) and height == width:
            preprocess = Preprocess(resolution=height)  # a foreign classifier: ImageNet preprocessing at its size
        else:
            raise UserError(f"{path}: no mnv2 preprocessing metadata and no fixed square input size")
        try:
            names = resolve_class_names(meta.get(META_CLASSES), num_classes)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        runner = onnx_runner(path, proto, name, threads)
        return cls(runner, name, preprocess, names, batch_size, fixed_batch=batch,
                   output=meta.get(META_OUTPUT, "softmax"))

    # the four steps ----------------------------------------------------------------------------------------------
    def load(self, images: Sequence) -> np.ndarray:
        """Images (paths or PIL) -> the preprocessed float32 batch; before an onnxruntime / OpenVINO backend on one
        torch thread (`one_torch_thread`)."""
        with self.beside_runtime():
            return self.preprocess(list(images)).numpy()

    def beside_runtime(self):
        """A context for torch work around an onnxruntime / OpenVINO backend's runs (preprocessing, a last step):
        `one_torch_thread`. No change on a torch backend."""
        return contextlib.nullcontext() if self.backend_name.startswith("torch") else one_torch_thread()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch -> logits (the first output), in chunks of the batch size."""
        return self.run_outputs(batch)[0]

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Preprocessed batch -> every output of the model, in chunks of the batch size."""
        chunks = []
        for i in range(0, len(batch), self.batch_size):
            x = batch[i:i + self.batch_size]
            n = len(x)
            if self.fixed_batch and n < self.fixed_batch:  # pad a static-batch graph's last chunk
                x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), x.dtype)])
            chunks.append([o[:n] for o in self.backend.outputs(x)])
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def postprocess(self, logits: np.ndarray, topk: int = 5) -> list[list[Prediction]]:
        probs = class_probabilities(logits, self.output)
        k = max(1, min(topk, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[Prediction(int(c), self.class_names[c], float(p[c])) for c in row] for p, row in zip(probs, order)]

    def predict(self, images: Sequence, topk: int = 5) -> list[list[Prediction]]:
        results = []
        for i in range(0, len(images), self.batch_size):  # preprocess per chunk: bounded memory for many images
            results += self.postprocess(self.run(self.load(images[i:i + self.batch_size])), topk)
        return results


def onnx_backend_name(path: str | Path, meta: dict, backend: str | None) -> str:
    """The backend an .onnx file runs on: `backend` if it can, else the default for the file (int8 or fp32)."""
    name = backend or (default_backend(int8=True) if META_INT8 in meta else "onnxruntime")
    if name not in ONNX_BACKENDS:
        raise UserError(f"{path}: an .onnx file runs on {', '.join(ONNX_BACKENDS)}, not backend {name!r}")
    if name in INT8_BACKENDS and META_INT8 not in meta:
        raise UserError(f"{path}: not an int8 model (export one with `mnv2 export --int8`)")
    _check_backend(name)
    return name


def onnx_runner(path: str | Path, proto, name: str, threads: int | None):
    try:
        runtime = OpenVinoBackend if name.startswith("openvino") else OnnxRuntimeBackend
        return runtime(proto.SerializeToString(), threads)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def inspect_onnx(path: str | Path):
    """(proto, mnv2 metadata, (batch, H, W) with None for dynamic dims, number of classes) of an image classifier,
    detector or segmentation .onnx file, or one UserError naming the file and what is wrong with it. A detector
    (outputs named as mnv2.deploy.export_detection writes them) has metadata "mnv2.task" = "detection" and C object
    classes; a segmentation model (one 4-D output [N, C, H, W]) "mnv2.task" = "segmentation" and C pixel classes."""
    onnx = optional_import("onnx", "export", "reading .onnx files")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError, onnx's checker errors, OSError for missing
        # external data: they share no base narrower than Exception, and each must be this one line
        raise UserError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    outputs = tuple(o.name for o in graph.output)
    if len(graph.node) > 0 and len(inputs) == 1 and outputs in (DETECTION_OUTPUTS, RAW_OUTPUTS):
        return _inspect_detector(path, proto, inputs[0])
    if len(graph.node) > 0 and len(inputs) == 1 and len(graph.output) == 1 and len(_dims(graph.output[0])) == 4:
        return _inspect_segmenter(path, proto, inputs[0], graph.output[0])
    if len(graph.node) == 0 or len(inputs) != 1 or len(graph.output) != 1:
        raise UserError(f"{path}: not an image classifier graph ({len(inputs)} inputs, {len(graph.output)} outputs, "
                        f"{len(graph.node)} nodes; expected one image input and one logits output)")

    batch_size, shape_out = _image_input(path, inputs[0]), _dims(graph.output[0])
    if len(shape_out) != 2 or shape_out[1] is None:
        raise UserError(f"{path}: output shape {shape_out} is not class logits [N, C]")
    return proto, _metadata(path, proto), batch_size, shape_out[1]


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _image_input(path: Path, value_info, pixels: bool = False) -> tuple[int | None, int | None, int | None]:
    """(batch, H, W) of a graph's image input, None for dynamic dims: the normalised float32 batch [N, 3, H, W], or
    with `pixels` a detector's uint8 RGB pixels [N, H, W, 3]; else one UserError naming the file. (The backends feed
    an input of the type the graph declares: a float batch cast to uint8, or the reverse, would be silently wrong.)"""
    onnx = optional_import("onnx", "export", "reading .onnx files")
    want, layout = (onnx.TensorProto.UINT8, "N, H, W, 3") if pixels else (onnx.TensorProto.FLOAT, "N, 3, H, W")
    shape, dtype = _dims(value_info), value_info.type.tensor_type.elem_type
    channels = shape[3] if pixels and len(shape) == 4 else shape[1] if len(shape) == 4 else None
    if dtype != want or channels != 3:
        kind = "a batch of uint8 RGB pixels" if pixels else "a float32 RGB image batch"
        got = onnx.helper.tensor_dtype_to_np_dtype(dtype).name if dtype else "untyped"
        raise UserError(f"{path}: input {value_info.name!r} is {got} {shape}, not {kind} [{layout}]")
    return (shape[0], shape[1], shape[2]) if pixels else (shape[0], shape[2], shape[3])


def _metadata(path: Path, proto) -> dict:
    try:
        return read_metadata(proto)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _inspect_detector(path: Path, proto, image_input):
    """As inspect_onnx; a detector takes uint8 pixels [N, H, W, 3] (or, exported before them, [N, 3, H, W])."""
    batch_size, meta = _image_input(path, image_input, pixels=image_input.name == PIXELS_NAME), _metadata(path, proto)
    if meta.get(META_TASK) != "detection" or not isinstance(meta.get(META_CLASSES), list):
        raise UserError(f"{path}: a detection graph without mnv2 detection metadata (task, class names); export it "
                        "with `mnv2 export`")
    return proto, meta, batch_size, len(meta[META_CLASSES])


def _inspect_segmenter(path: Path, proto, image_input, logits_output):
    batch_size, shape_out, meta = _image_input(path, image_input), _dims(logits_output), _metadata(path, proto)
    if meta.get(META_TASK) != SEGMENTATION or not isinstance(meta.get(META_CLASSES), list):
        raise UserError(f"{path}: a per-pixel output {shape_out} without mnv2 segmentation metadata (task, class "
                        "names); export it with `mnv2 export`")
    if shape_out[1] is None:
        raise UserError(f"{path}: output shape {shape_out} has no fixed number of classes [N, C, H, W]")
    return proto, meta, batch_size, shape_out[1]
