"""The runtimes a network is timed on: PyTorch itself, ONNX Runtime, TensorRT.

Each backend says what it can time (:func:`check_backend`, called by ``TimingSpec``), what it
needs installed (:func:`require_backend`), what a table records about it
(:func:`backend_info`), and turns a prepared module into the callable the timing engines run
(:func:`runtime_net`; :func:`reference_net` for the full net every cell is paired with, built
once per profile).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gator_hw.errors import GatorError

if TYPE_CHECKING:
    from gator_hw.profile.spec import TimingSpec

__all__ = ["BACKENDS", "backend_info", "check_backend", "reference_net", "require_backend",
           "runtime_net", "runtime_slug"]

#: Runtimes a network can be timed on.
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")

#: What a table's device folder gets appended for its runtime (``profiles/cpu-amd-epyc-ort``).
_SLUGS = {"torch": "", "onnxruntime": "-ort", "tensorrt": "-trt"}


def check_backend(spec: TimingSpec) -> None:
    """A one-line GatorError when ``spec``'s backend cannot time ``spec``'s setting."""
    if spec.backend not in BACKENDS:
        raise GatorError(f"unknown --backend '{spec.backend}'; use one of {', '.join(BACKENDS)}")
    if spec.backend == "onnxruntime" and (spec.device != "cpu" or spec.dtype != "float32"
                                          or spec.channels_last):
        raise GatorError(
            "--backend onnxruntime times float32 contiguous networks on the CPU; use "
            "--device cpu --dtype float32 without --channels-last, or --backend torch"
        )
    if spec.backend == "tensorrt" and (not spec.device.startswith("cuda") or spec.channels_last):
        raise GatorError(
            "--backend tensorrt times networks on an NVIDIA GPU and picks its own layouts; use "
            "--device cuda without --channels-last, or --backend torch / onnxruntime"
        )


def require_backend(name: str) -> Any:
    """The backend's runtime module (``None`` for torch), or a one-line install hint."""
    if name == "onnxruntime":
        from gator_hw.profile.ort import require_ort

        return require_ort()
    if name == "tensorrt":
        from gator_hw.profile.trt import require_trt

        return require_trt()
    return None


def backend_info(spec: TimingSpec) -> dict[str, Any] | None:
    """The runtime's version and session / builder settings for a table's sidecar."""
    if spec.backend == "onnxruntime":
        from gator_hw.profile.ort import ort_info

        return ort_info()
    if spec.backend == "tensorrt":
        from gator_hw.profile.trt import trt_info

        return trt_info(spec.tf32)
    return None


def runtime_slug(spec: TimingSpec) -> str:
    """The device folder's suffix for ``spec``'s runtime."""
    return _SLUGS.get(spec.backend, f"-{spec.backend}")


def runtime_net(model: nn.Module, x: torch.Tensor, spec: TimingSpec
                ) -> nn.Module | Callable[..., object]:
    """What the timing engines call for ``model`` (already on the spec's device and dtype)."""
    if spec.backend == "onnxruntime":
        from gator_hw.profile.ort import OrtNet

        return OrtNet(model, x, threads=spec.threads)
    if spec.backend == "tensorrt":
        from gator_hw.profile.trt import TrtNet

        return TrtNet(model, x, tf32=spec.tf32)
    return model


#: The last reference network's runtime net, keyed by (backend, module id, each parameter's
#: storage and version, input shape and dtype, threads, tf32): an edited or another network
#: never reuses it.
_REFERENCE: dict[tuple, Any] = {}


def reference_net(model: nn.Module, x: torch.Tensor, spec: TimingSpec
                  ) -> nn.Module | Callable[..., object]:
    """:func:`runtime_net` of the reference, built once while the reference is unchanged."""
    if spec.backend == "torch":
        return model
    state = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    key = (spec.backend, id(model), state, tuple(x.shape), x.dtype, spec.threads, spec.tf32)
    if key not in _REFERENCE:
        _REFERENCE.clear()
        _REFERENCE[key] = runtime_net(model, x, spec)
    return _REFERENCE[key]
