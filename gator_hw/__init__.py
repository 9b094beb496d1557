"""gator-hw: hardware-aware channel pruning of PyTorch CNNs with learned gates (GATOR)."""

from gator_hw.errors import GatorError

__version__ = "0.1.0"

__all__ = ["GatorError", "__version__"]
