"""Profile tables -> measured networks: per-edge widths and latency, ready for fitting.

Each timed variant becomes one sample: its kept channels per edge ``W`` (edge order) and its
latency. Latencies are paired within rounds: a variant's time is ``median_ms / baseline_ms``
of its round, times the median baseline over all rounds, so slow drift of the machine cancels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph

__all__ = ["Samples", "file_sha256", "load_samples", "runtime_of"]

_CONTEXT_KEYS = (
    "model", "batch", "dtype", "channels_last", "device_name", "input_size", "num_classes",
    "threads", "regime", "backend",
)


@dataclass(frozen=True)
class Samples:
    """Measured networks of one model on one device setting.

    ``widths[i]`` are the kept channels per edge of sample ``i``, ``latency_ms[i]`` its
    round-paired latency, ``kind[i]`` ``baseline`` / ``edge`` / ``random``, ``edge[i]`` the
    narrowed edge (-1 otherwise), ``fraction[i]`` the requested width of edge probes.
    """

    variant: np.ndarray
    kind: np.ndarray
    edge: np.ndarray
    fraction: np.ndarray
    widths: np.ndarray
    latency_ms: np.ndarray
    baseline_ms: float
    batch: int
    dtype: str
    context: dict

    def __len__(self) -> int:
        return len(self.variant)

    def subset(self, mask: np.ndarray) -> Samples:
        """The samples where ``mask`` is true."""
        return Samples(
            self.variant[mask], self.kind[mask], self.edge[mask], self.fraction[mask],
            self.widths[mask], self.latency_ms[mask], self.baseline_ms, self.batch, self.dtype,
            self.context,
        )

    @property
    def groups(self) -> np.ndarray:
        """Cross-validation groups: the narrowed edge, or the variant itself."""
        return np.array(
            [f"edge{e}" if k == "edge" else v for k, e, v in
             zip(self.kind, self.edge, self.variant, strict=True)]
        )

    def __str__(self) -> str:
        kinds = pd.Series(self.kind).value_counts().to_dict()
        return (f"{len(self)} measured networks ({kinds}), baseline {self.baseline_ms:.4g} ms, "
                f"batch {self.batch}, {self.dtype}")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _widths_of(row: pd.Series, full: np.ndarray) -> np.ndarray:
    w = full.copy()
    if row["kind"] == "edge":
        w[int(row["edge"])] = int(row["kept"])
    elif row["kind"] == "random":
        w = np.asarray(json.loads(row["widths"]), dtype=np.int64)
        if w.shape != full.shape:
            raise GatorError(
                f"random net {row['variant']} lists {len(w)} edge widths but the model has "
                f"{len(full)} edges; profile this model again"
            )
    return w


def _metadata(path: Path) -> dict:
    from gator_hw.profile.tables import sidecar_path

    side = sidecar_path(path)
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GatorError(f"cannot read the metadata {side} of {path}: {exc}") from exc


def _context(meta: dict) -> dict:
    flat = {**meta, **meta.get("spec", {}), **meta.get("device", {})}
    flat.setdefault("backend", "torch")  # tables from before the backend was recorded
    return {k: flat.get(k) for k in _CONTEXT_KEYS}


def runtime_of(context: dict) -> str:
    """The runtime a table (or a cost model's tables) was timed in: ``torch`` for tables from
    before the backend was recorded."""
    return str(context.get("backend") or "torch")


def load_samples(tables: Sequence[str | Path], graph: HyperGraph) -> Samples:
    """Read one or more tidy profile tables of ``graph``'s model into ``Samples``.

    All tables must come from the same model, batch, dtype, layout and device.
    """
    from gator_hw.profile.tables import read_table

    if not tables:
        raise GatorError("no profile table given; pass --tables profiles/<device>/<file>.csv")
    frames, contexts = [], []
    for i, path in enumerate(tables):
        df = read_table(path, graph)
        if df.empty:
            raise GatorError(f"profile table {path} has no rows; profile the model first")
        contexts.append(_context(_metadata(Path(path))))
        frames.append(df.assign(table=i))
    for path, ctx in zip(tables[1:], contexts[1:], strict=True):
        diff = [k for k in _CONTEXT_KEYS if ctx[k] != contexts[0][k]]
        if diff:
            raise GatorError(
                f"{path} was measured with another {', '.join(diff)} than {tables[0]}; fit one "
                "cost model per model, device, batch and dtype"
            )
    df = pd.concat(frames, ignore_index=True)
    df = df[df["baseline_ms"] > 0]
    baseline = float(df.loc[df["kind"] == "baseline", "median_ms"].median())
    df = df.assign(paired=df["median_ms"] / df["baseline_ms"] * baseline)
    full = np.array([e.channels for e in graph.edges], dtype=np.int64)
    rows = []
    for (_, vid), g in df.groupby(["table", "variant"], sort=False):
        first = g.iloc[0]
        rows.append((vid, first["kind"], int(first["edge"]), float(first["width"]),
                     _widths_of(first, full), float(g["paired"].median())))
    # the same variant measured in several tables is one network: pool it
    pooled: dict[str, list] = {}
    for r in rows:
        pooled.setdefault(r[0], []).append(r)
    uniq = [(*rs[0][:5], float(np.median([r[5] for r in rs]))) for rs in pooled.values()]
    ctx = contexts[0]
    return Samples(
        variant=np.array([u[0] for u in uniq]),
        kind=np.array([u[1] for u in uniq]),
        edge=np.array([u[2] for u in uniq]),
        fraction=np.array([u[3] for u in uniq]),
        widths=np.stack([u[4] for u in uniq]),
        latency_ms=np.array([u[5] for u in uniq]),
        baseline_ms=baseline,
        batch=int(ctx.get("batch") or 1),
        dtype=str(ctx.get("dtype") or "float32"),
        context=ctx,
    )
