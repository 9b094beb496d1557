"""gator-hw: hardware-aware channel pruning of PyTorch CNNs with learned gates (GATOR)."""

from gator_hw.errors import GatorError

__version__ = "0.1.0"

__all__ = ["GatorError", "__version__", "load"]


def load(directory, *, device="cpu"):
    """Load a converted model saved by ``gator-hw convert`` (see ``gator_hw.io.load``)."""
    from gator_hw.io import load as _load

    return _load(directory, device=device)
