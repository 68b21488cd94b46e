"""The declared feature API shared by the backbones: which intermediate maps a detector or segmenter may tap."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureTap:
    """One tappable feature map: its name, output stride relative to the input, and channel count."""

    name: str
    stride: int
    channels: int
