"""Weight import with output parity: torchvision, timm and Keras MobileNetV2 weights -> `mnv2` models, and back to
torchvision.

Each importer returns an `Imported` (model in eval mode, its build kwargs, the preprocessing record the weights expect,
the source library); `Imported.save(path)` writes a self-describing `.safetensors` file.
"""

from .common import WIDTHS, Imported, preprocess_record, read_state_dict
from .keras import from_keras, read_keras_weights
from .timm import from_timm
from .torchvision import from_torchvision, to_torchvision

__all__ = ["WIDTHS", "Imported", "from_keras", "from_timm", "from_torchvision", "preprocess_record",
           "read_keras_weights", "read_state_dict", "to_torchvision"]
