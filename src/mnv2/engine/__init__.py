"""Training: typed configs, the one training loop with task adapters, optimisers, checkpoints, DDP, fast path."""

from pathlib import Path

from .config import Config, load_config
from .optim import RMSpropTF, build_optimizer, build_schedule


def recipes_dir() -> Path:
    """The shipped recipes (package data `mnv2/configs/*.yaml`; the repository's top-level configs/ links here)."""
    return Path(__file__).resolve().parents[1] / "configs"


__all__ = ["Config", "RMSpropTF", "build_optimizer", "build_schedule", "load_config", "recipes_dir"]
