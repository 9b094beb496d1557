"""Shared CLI pieces: consoles and option types."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.console import Console

__all__ = [
    "BackendName", "BackendOption", "InputSize", "ModelName", "NumClasses", "console",
    "err_console",
]

console = Console()
err_console = Console(stderr=True)

ModelName = Annotated[
    str,
    typer.Argument(help="A torchvision builder (resnet50, mobilenet_v2, ...), a CIFAR ResNet "
                   "(resnet20, resnet56), or path/to/file.py:factory."),
]
InputSize = Annotated[
    int | None,
    typer.Option(
        "--input-size",
        help="Square input side in pixels (default: the model's own: "
        "224, 299 for Inception, 32 for CIFAR nets).",
    ),
]
NumClasses = Annotated[
    int, typer.Option("--num-classes", help="Classifier outputs of the built model.")
]


class BackendName(str, Enum):
    """The runtime the forwards are timed in."""

    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


BackendOption = Annotated[
    BackendName,
    typer.Option(
        "--backend",
        help="Runtime to time in: torch; onnxruntime (the network exported to ONNX, run in "
        "an InferenceSession on the CPU, as it is deployed; pip install 'gator-hw[onnx]'); or "
        "tensorrt (a strongly typed TensorRT engine on --device cuda; pip install tensorrt).",
    ),
]
