"""Timing on ONNX Runtime: the network as it is deployed, not as PyTorch runs it.

A network timed with ``backend="onnxruntime"`` is exported to ONNX in memory (the TorchScript
exporter where torch still has it: it takes milliseconds, which matters for hundreds of
variants; else the dynamo exporter), its output is checked once against PyTorch's on the
timing input (:data:`ORT_RTOL` relative), and each call is one ``run_with_iobinding`` of an
``InferenceSession`` with the input bound once: ``intra_op_num_threads`` = the spec's threads,
one inter-op thread, sequential execution, graph optimisation level :data:`ORT_OPT_LEVEL`, the
CPU execution provider. Those settings and the runtime's version go in the table's sidecar;
the timing protocol around the calls (warm-up, blocks, interleaving, paired ratios) is the
PyTorch backend's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from gator_hw.errors import GatorError

__all__ = ["ORT_OPT_LEVEL", "ORT_PROVIDER", "ORT_RTOL", "OrtNet", "onnx_bytes", "ort_info",
           "require_ort"]

#: Graph optimisation level of every session (ONNX Runtime's default for deployment).
ORT_OPT_LEVEL = "ORT_ENABLE_ALL"

#: Execution provider of every session.
ORT_PROVIDER = "CPUExecutionProvider"

#: Inter-op threads and execution mode of every session.
ORT_INTER_OP_THREADS = 1
ORT_EXECUTION_MODE = "ORT_SEQUENTIAL"

#: Largest relative difference (max |ORT - torch| / max |torch|) a timed export may have.
ORT_RTOL = 1e-4


def require_ort() -> Any:
    """The ``onnxruntime`` module, or a one-line GatorError naming the install."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise GatorError(
            f"--backend onnxruntime needs {' and '.join(missing)}; pip install 'gator-hw[onnx]'"
        )
    import onnxruntime

    return onnxruntime


def ort_info() -> dict[str, Any]:
    """What a table timed on ONNX Runtime records about it (sidecar ``backend_info``)."""
    ort = require_ort()
    return {"onnxruntime": ort.__version__, "graph_optimization_level": ORT_OPT_LEVEL,
            "execution_provider": ORT_PROVIDER, "inter_op_threads": ORT_INTER_OP_THREADS,
            "execution_mode": ORT_EXECUTION_MODE}


def onnx_bytes(model: nn.Module, x: torch.Tensor, *, backend: str = "onnxruntime") -> bytes:
    """``model`` at ``x``'s fixed shape as an ONNX model in memory (``backend`` names the
    runtime in a failure's message)."""
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"]}
    legacy = "dynamo" in inspect.signature(torch.onnx.export).parameters
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                try:
                    buf = io.BytesIO()
                    torch.onnx.export(model, (x,), buf, dynamo=False, **kwargs)
                    return buf.getvalue()
                except (TypeError, RuntimeError, ImportError):
                    pass  # a torch without the TorchScript exporter: the dynamo one below
            prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kwargs)
            return prog.model_proto.SerializeToString()
    except Exception as exc:  # an exporter failure names an op we cannot time there
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise GatorError(
            f"ONNX export for --backend {backend} failed ({type(exc).__name__}: {first}); "
            "time this model with --backend torch"
        ) from exc


class OrtNet:
    """``model`` at input ``x`` as an ONNX Runtime session; calling it runs one forward.

    The input is bound once (``x``, float32 on the CPU), so a call times the runtime alone.
    ``rel_error`` is the export's difference from PyTorch on ``x``; above :data:`ORT_RTOL` the
    constructor raises.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, *, threads: int) -> None:
        ort = require_ort()
        model = model.eval()
        with torch.inference_mode():
            want = model(x).detach().float().numpy()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = ORT_INTER_OP_THREADS
        opts.execution_mode = getattr(ort.ExecutionMode, ORT_EXECUTION_MODE)
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPT_LEVEL)
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes(model, x), opts,
                                            providers=[ORT_PROVIDER])
        self.x = np.ascontiguousarray(x.detach().numpy())
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input(self.session.get_inputs()[0].name, self.x)
        self.binding.bind_output(self.session.get_outputs()[0].name)
        self()
        got = self.output()
        scale = float(np.abs(want).max()) or 1.0
        self.rel_error = float(np.abs(got - want).max()) / scale
        if not self.rel_error <= ORT_RTOL:
            raise GatorError(
                f"the ONNX Runtime session differs from PyTorch by {self.rel_error:.2e} "
                f"relative (limit {ORT_RTOL:g}); time this model with --backend torch"
            )

    def __call__(self, *_: object) -> None:
        """One forward on the bound input (what a timed call runs)."""
        self.session.run_with_iobinding(self.binding)

    def output(self) -> np.ndarray:
        """The last forward's output."""
        return self.binding.copy_outputs_to_cpu()[0]
