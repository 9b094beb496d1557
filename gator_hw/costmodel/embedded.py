"""A cost model carried inside a gating config: everything pruning needs, no pickle, no tables.

``make-config`` writes the fitted model into the config's ``cost_model`` key::

    {"format": "gator-hw/embedded-costmodel", "format_version": 1,
     "model": "resnet18", "input_size": 64, "num_classes": 10, "batch": 8, "dtype": "float32",
     "method": "ridge", "params": {...}, "features": [...],
     "samples": {"variants": [...], "widths": [[...]], "latency_ms": [...]},
     "samples_sha256": "...", "check": {"full_ms": ..., "half_ms": [...]},
     "tables": [{"path": ..., "sha256": ...}], "versions": {...}, "context": {...}}

Loading refits the estimator on the embedded measured networks (deterministic), and checks the
feature names, the samples' hash and the predictions recorded at fit time, so a config either
gives exactly the latency function it was made with or a one-line error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from gator_hw.costmodel.dataset import runtime_of
from gator_hw.costmodel.model import CostModel, refit
from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph

__all__ = ["EMBED_FORMAT", "embed_cost_model", "embedded_cost_model"]

EMBED_FORMAT = "gator-hw/embedded-costmodel"
#: relative difference allowed between the recorded and the refitted predictions
CHECK_RTOL = 1e-6
_REQUIRED = ("model", "input_size", "batch", "dtype", "method", "params", "features", "samples",
             "samples_sha256", "check")


def _samples_hash(samples: dict) -> str:
    text = json.dumps(samples, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _half_widths(graph: HyperGraph) -> np.ndarray:
    full = np.array([e.channels for e in graph.edges], dtype=np.int64)
    rows = [full]
    for e in graph.edges:
        w = full.copy()
        w[e.gid] = max(1, e.channels // 2)
        rows.append(w)
    return np.stack(rows)


def embed_cost_model(cm: CostModel) -> dict[str, Any]:
    """The JSON-ready description of ``cm`` that :func:`embedded_cost_model` rebuilds."""
    import sklearn

    from gator_hw import __version__
    from gator_hw.costmodel.dataset import load_samples

    g = cm.graph
    samples = load_samples([t["path"] for t in cm.tables], g) if cm.tables else None
    if samples is None:
        raise GatorError("this cost model has no tables to embed; fit it with make-config")
    fit = samples.subset(np.isin(samples.variant, cm.fit_variants))
    block = {
        "variants": fit.variant.tolist(),
        "widths": fit.widths.astype(int).tolist(),
        "latency_ms": [float(x) for x in fit.latency_ms],
    }
    pred = cm.predict(_half_widths(g))
    params = cm.to_json()["params"]
    ctx = {k: v for k, v in cm.context.items() if v is not None}
    return {
        "format": EMBED_FORMAT,
        "format_version": 1,
        "model": g.model_name,
        "input_size": int(g.input_shape[-1]),
        "num_classes": ctx.get("num_classes"),
        "batch": cm.fmap.batch,
        "dtype": cm.fmap.dtype,
        "method": cm.method,
        "params": params,
        "features": cm.feature_names(),
        "baseline_ms": cm.baseline_ms,
        "cv_mape": cm.cv_mape,
        "samples": block,
        "samples_sha256": _samples_hash(block),
        "check": {"full_ms": float(pred[0]), "half_ms": [float(x) for x in pred[1:]]},
        "tables": list(cm.tables),
        "context": ctx,
        "versions": {"gator_hw": __version__, "scikit_learn": sklearn.__version__},
    }


def _fail(what: str) -> GatorError:
    return GatorError(f"the config's cost_model {what}; make the config again with "
                      "gator-hw make-config")


def _check_doc(doc: Any) -> None:
    if not isinstance(doc, dict) or doc.get("format") != EMBED_FORMAT:
        raise _fail(f"is not a {EMBED_FORMAT} object")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise _fail(f"lacks {', '.join(missing)}")
    s = doc["samples"]
    if not isinstance(s, dict) or not {"widths", "latency_ms"} <= set(s):
        raise _fail("has no samples (widths, latency_ms)")
    if _samples_hash(s) != doc["samples_sha256"]:
        raise _fail("samples do not match their sha256 (the file was edited)")


def embedded_cost_model(doc: dict, graph: HyperGraph | None = None) -> CostModel:
    """Rebuild the cost model of a config's ``cost_model`` entry.

    ``graph`` is the pruned network's graph; the cost model is evaluated on the network that
    was profiled (same edges, its own classifier size), rebuilt here when they differ.

    Raises
    ------
    GatorError
        If the entry is malformed or edited, does not match ``graph``'s edges, or refits to
        other predictions than it recorded.
    """
    _check_doc(doc)
    own = _profiled_graph(doc, graph)
    widths = np.asarray(doc["samples"]["widths"], dtype=np.int64)
    if widths.ndim != 2 or widths.shape[1] != own.n_edges:
        raise _fail(f"samples have {widths.shape[-1]} edge widths, the network {own.n_edges}")
    lat = np.asarray(doc["samples"]["latency_ms"], dtype=float)
    fmap, est = refit(own, doc["method"], doc["params"], widths, lat, int(doc["batch"]),
                      str(doc["dtype"]), runtime_of(dict(doc.get("context", {}))))
    cm = CostModel(own, fmap, doc["method"], est, float(doc.get("baseline_ms", lat.max())),
                   list(doc["samples"].get("variants", [])), dict(doc.get("cv_mape", {})),
                   list(doc.get("tables", [])), dict(doc.get("context", {})))
    if cm.feature_names() != doc["features"]:
        raise _fail("names other features than this version of gator-hw computes")
    want = np.array([doc["check"]["full_ms"], *doc["check"]["half_ms"]], dtype=float)
    got = cm.predict(_half_widths(own))
    if got.shape != want.shape or not np.allclose(got, want, rtol=CHECK_RTOL, atol=0.0):
        worst = float(np.max(np.abs(got / want - 1))) if got.shape == want.shape else float("nan")
        raise _fail(f"refits to other predictions than recorded (worst {worst:.2e} relative; "
                    f"made with scikit-learn {doc.get('versions', {}).get('scikit_learn')})")
    return cm


def _profiled_graph(doc: dict, graph: HyperGraph | None) -> HyperGraph:
    from gator_hw.network import load_network

    size = int(doc["input_size"])
    if graph is not None and (graph.model_name != doc["model"]
                              or int(graph.input_shape[-1]) != size):
        raise GatorError(
            f"the config's cost model measured {doc['model']} at {size} px, not "
            f"{graph.model_name} at {graph.input_shape[-1]} px; use a config made for this "
            "network and --input-size"
        )
    classes = doc.get("num_classes")  # absent: the table's net had its builder's default
    if graph is not None and classes is not None and _classes(graph) == classes:
        return graph
    kw = {"num_classes": int(classes)} if classes is not None else {}
    own = load_network(doc["model"], input_size=size, **kw).graph
    if graph is not None and _classes(graph) == _classes(own):
        return graph
    if graph is not None and [e.channels for e in own.edges] != [e.channels
                                                                 for e in graph.edges]:
        raise GatorError(
            f"the config's cost model has edges {[e.channels for e in own.edges][:6]}..., the "
            f"network {[e.channels for e in graph.edges][:6]}...; make a config for this network"
        )
    return own


def _classes(graph: HyperGraph) -> int | None:
    """Outputs of the network (the width of its last layer call)."""
    last = graph.calls[-1] if graph.calls else None
    if last is None:
        return None
    return int(sum(s.width for s in last.out_layout))
