"""Training checkpoints: tensors in safetensors, everything else in a JSON beside them.

A checkpoint ``NAME`` in a run folder is two files, each written atomically::

    NAME.safetensors   model.*, gates.*, optim.<param>.<key>, rng.* tensors
    NAME.json          epoch, step, settings, budget state, optimizer groups, the model's
                       edge signature and the SHA-256 of NAME.safetensors

The pair is replaced as one: the new tensors go to ``NAME.safetensors.pending`` first, then the
JSON (naming their hash), then the pending file takes the tensor file's place. A run killed
before the JSON is written keeps the old pair; one killed after it finds the pending tensors
that match the new JSON (:func:`load_checkpoint` completes the swap). No pickles: loading runs
no code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from gator_hw.atomic import write_bytes, write_json
from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph

__all__ = [
    "FORMAT",
    "Checkpoint",
    "check_signature",
    "load_checkpoint",
    "model_signature",
    "save_checkpoint",
]

#: Format tag stored in every checkpoint JSON.
FORMAT = "gator-hw-checkpoint/1"


def model_signature(graph: HyperGraph) -> dict[str, Any]:
    """What identifies a model for resuming: name, input shape and every edge's width."""
    return {
        "model": graph.model_name,
        "input_shape": list(graph.input_shape),
        "edges": [[e.name, e.channels] for e in graph.edges],
    }


def check_signature(meta: dict[str, Any], graph: HyperGraph, source: str) -> None:
    """GatorError unless the checkpoint ``meta`` was written for ``graph``'s model."""
    want, got = model_signature(graph), meta.get("signature", {})
    if got.get("edges") != want["edges"]:
        raise GatorError(
            f"checkpoint {source} is from {got.get('model', '?')} with "
            f"{len(got.get('edges', []))} edges, not {want['model']} with {len(want['edges'])}; "
            "resume with the model it was trained with"
        )


class Checkpoint:
    """A loaded checkpoint: ``tensors`` by name and the JSON ``meta``."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path):
        self.tensors, self.meta, self.path = tensors, meta, path

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.``, with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def __str__(self) -> str:
        return (
            f"Checkpoint({self.path}, epoch {self.meta.get('epoch')}, {len(self.tensors)} tensors)"
        )


def save_checkpoint(base: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``base.safetensors`` then ``base.json`` atomically; return the JSON path."""
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = save(flat)
    tensor_path = base.with_suffix(".safetensors")
    pending = _pending(tensor_path)
    write_bytes(pending, blob)
    meta = {
        **meta,
        "format": FORMAT,
        "tensors": tensor_path.name,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    out = write_json(base.with_suffix(".json"), meta)
    os.replace(pending, tensor_path)
    return out


def _pending(tensor_path: Path) -> Path:
    return tensor_path.with_name(tensor_path.name + ".pending")


def _matching_blob(tensor_path: Path, sha: str | None) -> bytes | None:
    """The tensor bytes whose hash is ``sha``: the tensor file's, or a pending write's (a save
    cut off between its JSON and its last rename; the rename is completed here)."""
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() == sha:
        return blob
    pending = _pending(tensor_path)
    if pending.is_file():
        blob = pending.read_bytes()
        if hashlib.sha256(blob).hexdigest() == sha:
            with contextlib.suppress(OSError):  # read-only: the bytes are right all the same
                os.replace(pending, tensor_path)
            return blob
    return None


def _resolve(path: Path) -> Path:
    if path.is_dir():
        path = path / "last.json"
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if path.suffix != ".json" and path.exists():
        raise GatorError(
            f"{path} is not a checkpoint; pass a run folder (from gator-hw prune) or its "
            "NAME.json checkpoint"
        )
    if not path.is_file():
        raise GatorError(
            f"checkpoint {path} not found; pass a run folder or its NAME.json checkpoint"
        )
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (run folder, ``NAME.json`` or ``NAME.safetensors``).

    Raises
    ------
    GatorError
        If a file is missing or unreadable, or the tensor file does not match its JSON.
    """
    from safetensors.torch import load

    json_path = _resolve(Path(path))
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise GatorError(
            f"cannot read checkpoint {json_path} ({type(exc).__name__}: {str(exc)[:80]}); "
            "resume from another checkpoint (epoch_NNN.json) or run again"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GatorError(f"{json_path} is not a gator-hw checkpoint (no format {FORMAT!r})")
    tensor_path = json_path.with_name(str(meta.get("tensors", "")))
    try:
        blob = _matching_blob(tensor_path, meta.get("tensors_sha256"))
    except OSError:
        raise GatorError(f"checkpoint {json_path} lacks its tensor file {tensor_path}") from None
    if blob is None:
        raise GatorError(
            f"{tensor_path} does not match {json_path} (hash differs); the pair was mixed up "
            "or the write was interrupted; resume from another checkpoint"
        )
    return Checkpoint(load(blob), meta, json_path)
