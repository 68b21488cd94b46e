"""Evaluation metrics per task."""

from .classification import classification_stats, summarize_classification

__all__ = ["classification_stats", "summarize_classification"]
