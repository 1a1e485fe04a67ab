"""Trained Rank Pruning for PyTorch."""
from . import models

__all__ = ["models"]
