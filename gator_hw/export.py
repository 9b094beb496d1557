"""Export a (converted) model to ONNX, TorchScript or a ``torch.export`` program, verified.

Every export is written atomically and then loaded back and run on a random batch of a
different size than the example (the batch dimension is dynamic); its outputs must equal
PyTorch's to ``rtol`` relative to the largest output magnitude.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gator_hw.atomic import atomic_path
from gator_hw.errors import GatorError

__all__ = ["ExportReport", "export_onnx", "export_program", "export_torchscript"]

#: largest allowed |exported - pytorch| / max|pytorch|
EXPORT_RTOL = 1e-4


@dataclass(frozen=True)
class ExportReport:
    """Where an export went and how far its outputs are from PyTorch's (None: not verified)."""

    fmt: str
    path: Path
    rel_error: float | None
    note: str = ""

    @property
    def verified(self) -> bool:
        return self.rel_error is not None and self.rel_error <= EXPORT_RTOL

    def __str__(self) -> str:
        if self.rel_error is None:
            return f"{self.fmt}: {self.path} (not verified: {self.note})"
        return f"{self.fmt}: {self.path} (max rel. error {self.rel_error:.2e})"


def _inputs(shape: tuple[int, ...], batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape[1:]), generator=g)


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _check(report: ExportReport) -> ExportReport:
    if report.rel_error is not None and report.rel_error > EXPORT_RTOL:
        raise GatorError(
            f"{report.fmt} export of {report.path} differs from PyTorch by {report.rel_error:.2e} "
            f"(limit {EXPORT_RTOL:g}); the model uses an op the exporter handles differently"
        )
    return report


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> ExportReport:
    """Export to ONNX with a dynamic batch; verified with onnxruntime when it is installed."""
    if importlib.util.find_spec("onnx") is None:
        raise GatorError("ONNX export needs the onnx package; pip install 'gator-hw[onnx]'")
    model = model.eval().cpu()
    path = Path(path)
    example = _inputs(input_shape, 2)
    kwargs: dict = {"input_names": ["input"], "output_names": ["logits"]}
    modern = (
        "dynamo" in inspect.signature(torch.onnx.export).parameters
        and importlib.util.find_spec("onnxscript") is not None
    )
    if modern:
        kwargs.update(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                      verbose=False, external_data=False)
    else:
        kwargs.update(dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    with atomic_path(path) as tmp:
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(tmp), **kwargs)
        except Exception as exc:  # exporter failures name an op we cannot fix here
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise GatorError(f"ONNX export failed ({type(exc).__name__}: {first})") from exc
    if importlib.util.find_spec("onnxruntime") is None:
        return ExportReport("onnx", path, None, "pip install 'gator-hw[onnx]' for onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _inputs(input_shape, 3, seed=1)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return _check(ExportReport("onnx", path, _rel_error(got, _reference(model, x))))


def export_torchscript(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path
) -> ExportReport:
    """Export with ``torch.jit.trace`` and verify the reloaded module."""
    model = model.eval().cpu()
    path = Path(path)
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; still widely deployed
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            scripted = torch.jit.trace(model, _inputs(input_shape, 2), check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp))
        loaded = torch.jit.load(str(path))
    x = _inputs(input_shape, 3, seed=1)
    return _check(
        ExportReport("torchscript", path, _rel_error(_reference(loaded, x), _reference(model, x)))
    )


def export_program(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path
) -> ExportReport:
    """Export with ``torch.export`` (dynamic batch) to a ``.pt2`` file and verify it."""
    model = model.eval().cpu()
    path = Path(path)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (_inputs(input_shape, 2),), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    loaded = torch.export.load(str(path)).module()
    x = _inputs(input_shape, 3, seed=1)
    return _check(
        ExportReport("torch.export", path, _rel_error(_reference(loaded, x), _reference(model, x)))
    )
