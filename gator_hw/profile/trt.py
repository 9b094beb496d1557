"""Timing on TensorRT: the network as an NVIDIA deployment runs it.

A network timed with ``backend="tensorrt"`` is exported to ONNX in memory (as for ONNX
Runtime), parsed into a **strongly typed** TensorRT network (so the ONNX types, i.e. the
spec's dtype, fix every layer's precision: ``float32`` / ``float16`` / ``bfloat16``, no
silent fp16 in an fp32 table), built into an engine with TF32 allowed only when the spec's
``tf32`` is, and run with ``execute_async_v3`` on the current CUDA stream from tensors bound
once. Its output is checked once against PyTorch's on the timing input
(:data:`TRT_RTOL` for the dtype). A call enqueues one forward, so the CUDA protocol around it
is the PyTorch backend's: warm-up on a side stream, CUDA-graph capture of the enqueue (or
eager enqueues), blocks bracketed by events, ABBA interleaving with the full net.

Engines are cached in memory by the ONNX bytes' hash, the precision flags and the device, so
the full net (the reference of every cell) and a variant seen twice are built once; all
builds of a process share one TensorRT timing cache, which makes the tactic search of a
network that differs from the last in a few widths fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import Any

import numpy as np
import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.profile.ort import onnx_bytes

__all__ = ["TRT_RTOL", "TRT_WORKSPACE_BYTES", "TrtNet", "require_trt", "trt_info"]

#: Largest relative difference (max |TRT - torch| / max |torch|) a built engine may have, per
#: dtype (float32 without TF32 differs from cuDNN by tactic rounding only).
TRT_RTOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}

#: Workspace TensorRT may use for tactics (bytes).
TRT_WORKSPACE_BYTES = 1 << 30

_ENGINES: dict[str, bytes] = {}
_STATE: dict[str, Any] = {}  # the process's logger and timing cache


def require_trt() -> Any:
    """The ``tensorrt`` module, or a one-line GatorError naming the install."""
    missing = [m for m in ("onnx", "tensorrt") if importlib.util.find_spec(m) is None]
    if missing:
        raise GatorError(
            f"--backend tensorrt needs {' and '.join(missing)} (NVIDIA GPUs only); "
            "pip install tensorrt onnx, or time with --backend torch"
        )
    import tensorrt

    return tensorrt


def trt_info(tf32: bool) -> dict[str, Any]:
    """What a table timed on TensorRT records about it (sidecar ``backend_info``)."""
    trt = require_trt()
    return {"tensorrt": trt.__version__, "strongly_typed": True, "tf32": bool(tf32),
            "workspace_bytes": TRT_WORKSPACE_BYTES, "timing_cache": "shared per process"}


def _logger(trt: Any) -> Any:
    if "logger" not in _STATE:
        _STATE["logger"] = trt.Logger(trt.Logger.ERROR)
    return _STATE["logger"]


def _build(trt: Any, onnx: bytes, *, tf32: bool) -> bytes:
    """A serialized engine of the ONNX model (strongly typed, TF32 as asked)."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        first = str(parser.get_error(0)).splitlines()[0][:200] if parser.num_errors else ""
        raise GatorError(f"TensorRT cannot parse this network's ONNX export ({first}); "
                         "time it with --backend torch")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if "timing_cache" not in _STATE:
        _STATE["timing_cache"] = config.create_timing_cache(b"")
    config.set_timing_cache(_STATE["timing_cache"], True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GatorError("TensorRT could not build an engine for this network (see its log); "
                         "time it with --backend torch")
    return bytes(plan)


def _engine_plan(trt: Any, onnx: bytes, x: torch.Tensor, *, tf32: bool) -> bytes:
    key = hashlib.sha256(onnx).hexdigest() + f":{tf32}:{x.device}:{trt.__version__}"
    if key not in _ENGINES:
        _ENGINES[key] = _build(trt, onnx, tf32=tf32)
    return _ENGINES[key]


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16}
    if dtype not in table:
        raise GatorError(f"the TensorRT engine's output has type {dtype}; gator-hw times "
                         "float32, float16 and bfloat16 networks")
    return table[dtype]


class TrtNet:
    """``model`` at input ``x`` as a TensorRT execution context; calling it enqueues one
    forward on the current CUDA stream.

    ``x`` (on the GPU, in the spec's dtype) and the output are bound once. ``rel_error`` is the
    engine's difference from PyTorch on ``x``; above :data:`TRT_RTOL` the constructor raises.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, *, tf32: bool = False) -> None:
        trt = require_trt()
        model = model.eval()
        with torch.inference_mode():
            want = model(x).detach().float().cpu().numpy()
        plan = _engine_plan(trt, onnx_bytes(model, x, backend="tensorrt"), x, tf32=tf32)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise GatorError(f"the TensorRT engine has {len(inputs)} inputs and {len(outputs)} "
                             "outputs; gator-hw times networks of one input and one output")
        self.x = x.contiguous()
        shape = tuple(self.context.get_tensor_shape(outputs[0]))
        dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(outputs[0]))
        self.out = torch.empty(shape, dtype=dtype, device=x.device)
        self.context.set_tensor_address(inputs[0], self.x.data_ptr())
        self.context.set_tensor_address(outputs[0], self.out.data_ptr())
        self()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        got = self.out.float().cpu().numpy()
        scale = float(np.abs(want).max()) or 1.0
        self.rel_error = float(np.abs(got - want).max()) / scale
        limit = TRT_RTOL.get(str(x.dtype).removeprefix("torch."), TRT_RTOL["float32"])
        if not self.rel_error <= limit:
            raise GatorError(
                f"the TensorRT engine differs from PyTorch by {self.rel_error:.2e} relative "
                f"(limit {limit:g}); time this model with --backend torch"
            )

    def __call__(self, *_: object) -> None:
        """Enqueue one forward on the bound tensors (what a timed call runs)."""
        stream = torch.cuda.current_stream(self.x.device).cuda_stream if self.x.is_cuda else 0
        if not self.context.execute_async_v3(stream):
            raise GatorError("TensorRT failed to enqueue a forward; time with --backend torch")
