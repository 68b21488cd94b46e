"""mnv2: MobileNetV2 (Sandler et al., CVPR 2018) as a library and command-line tool.

`create_model` and `list_models` are imported on first use (PEP 562), so `import mnv2` and the CLI's parser do not
import torch.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers and type checkers; at run time, see __getattr__
    from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
