"""Save and load converted models as ``model.safetensors`` + ``plan.json``: no pickle, no class.

``plan.json`` records how to rebuild the network: the builder name (or ``file.py:factory``),
the number of classes, the input size and the kept channel indices of every edge. Loading
builds the original architecture, converts it with the same plan (which gives every tensor its
pruned shape) and then loads the weights, checking every shape.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gator_hw.errors import GatorError

__all__ = ["FORMAT", "PLAN_FILE", "WEIGHTS_FILE", "load", "load_plan", "save"]

FORMAT = "gator-hw/converted-model"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


def _plan_document(
    name: str, num_classes: int, input_size: int, graph_edges: Sequence, keep: Mapping[int, list],
    provenance: Mapping[str, Any] | None,
) -> dict:
    from gator_hw import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gator_hw_version": __version__,
        "torch_version": torch.__version__,
        "model": name,
        "num_classes": num_classes,
        "input_size": input_size,
        "edges": [
            {"index": e.gid, "name": e.name, "channels": e.channels, "kept": list(keep[e.gid])}
            for e in graph_edges
        ],
        "removed_edges": [e.name for e in graph_edges if not keep[e.gid]],
        "provenance": dict(provenance or {}),
    }


def save(
    directory: str | Path,
    model: nn.Module,
    *,
    name: str,
    num_classes: int,
    input_size: int,
    graph,
    keep: Mapping[int, Sequence[int]],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/plan.json`` (all or nothing).

    ``model`` is the converted model, ``keep`` the plan it was converted with (edge index ->
    kept channel indices, every edge present), ``graph`` the hypergraph of the original model.
    """
    from safetensors.torch import save_file

    full = graph.normalize_plan(keep, min_keep=0)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        doc = _plan_document(name, num_classes, input_size, graph.edges, full, provenance)
        (tmp / PLAN_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_plan(directory: str | Path) -> dict:
    """Read and check ``plan.json`` of a converted model directory."""
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise GatorError(f"{path} does not exist; pass a directory written by `gator-hw convert`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GatorError(f"{path} is not valid JSON ({exc}); re-run gator-hw convert") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GatorError(f"{path} is not a gator-hw converted-model plan (format {FORMAT!r})")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise GatorError(f"{path} was written by a newer gator-hw; upgrade gator-hw to load it")
    missing = [k for k in ("model", "input_size", "num_classes", "edges") if k not in doc]
    edges = doc.get("edges")
    if not missing and (not isinstance(edges, list) or not all(
            isinstance(e, dict) and {"index", "name", "channels", "kept"} <= set(e)
            for e in edges)):
        missing = ["edges[].index/name/channels/kept"]
    if missing:
        raise GatorError(f"{path} lacks {', '.join(missing)} (edited or truncated); re-run "
                         "gator-hw convert")
    return doc


def load(directory: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model from ``directory`` (eval mode) without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gator_hw.convert import convert
    from gator_hw.network import load_network

    doc = load_plan(directory)
    net = load_network(doc["model"], input_size=doc["input_size"], num_classes=doc["num_classes"])
    edges = doc["edges"]
    ours = [(e.name, e.channels) for e in net.graph.edges]
    if [(e["name"], e["channels"]) for e in edges] != ours:
        raise GatorError(
            f"{Path(directory) / PLAN_FILE} does not match the edges of {doc['model']} "
            "(another model or another gator-hw version); convert the run again"
        )
    keep = {e["index"]: e["kept"] for e in edges}
    model = convert(net.model, net.graph, keep)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise GatorError(f"{weights} does not exist; the converted model is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GatorError(f"{weights} is not a readable safetensors file ({exc})") from exc
    _check_shapes(model, state, weights)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _check_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise GatorError(
            f"{path} does not fit its plan: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise GatorError(
                f"{path}: {k} has shape {tuple(state[k].shape)} but the plan gives {shape}"
            )
