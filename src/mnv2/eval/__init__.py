"""Evaluation metrics per task."""

from .classification import classification_stats, evaluate, summarize_classification

__all__ = ["classification_stats", "evaluate", "summarize_classification"]
