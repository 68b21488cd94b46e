"""What every classifier here shares: the pooled linear head and torchvision's weight initialisation."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Base of the classifiers: `forward_features` (per model) -> global average pool -> dropout -> linear.

    State-dict names `pool`, `dropout`, `classifier` are stable (weight import relies on them).
    """

    def _build_head(self, num_features: int, num_classes: int, dropout: float) -> None:
        self.num_features = num_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a new one for `num_classes` (0: none, features out), initialised as a new
        model's is; the rest of the model is kept (timm's method of the same name)."""
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(self.classifier.weight, 0, 0.01)
            nn.init.zeros_(self.classifier.bias)


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: He (fan-out) for convs, unit BN, N(0, 0.01) for the classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
