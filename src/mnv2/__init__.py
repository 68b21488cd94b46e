"""mnv2: MobileNetV2 (Sandler et al., CVPR 2018) as a library and command-line tool."""

from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]
