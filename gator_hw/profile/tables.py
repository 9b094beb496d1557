"""Profile tables: the tidy CSV, the GATOR-compatible CSV, the JSON sidecar, and loading.

The tidy CSV has one row per timed cell (variant x round):

==============  ======  ==========================================================
column          dtype   meaning
==============  ======  ==========================================================
variant         str     stable variant id (``full``, ``e003-k32``, ``r007-1a2b3c4d``)
kind            str     ``baseline``, ``edge`` or ``random``
round           int     round index; every round times the baseline first
edge            int     narrowed edge index (-1 for baseline and random rows)
edge_name       str     its name ("" for baseline and random rows)
channels        int     its full channel count (all edges summed for other rows)
width           float   requested fraction (kept / channels for other rows)
kept            int     channels kept (all edges summed for other rows)
flops           float   FLOPs (2 x MAC) of one forward of the whole batch
params          float   parameters of the network
bytes           float   bytes moved by one forward of the batch, at the timed dtype
n_blocks        int     timed blocks behind the statistics
median_ms       float   median per-forward time in ms
iqr_ms          float   its interquartile range in ms
rel_iqr         float   iqr_ms / median_ms
noisy           bool    the cell's noise (rel. IQR of its per-block ratios to the
                        interleaved baseline, else rel_iqr) > NOISY_REL_IQR after the
                        one re-measurement
baseline_ms     float   the cell's own interleaved baseline (flag ``interleaved``), else
                        the median of the full net in the same round
saving_ms       float   baseline_ms - median_ms (paired within the cell or the round)
saving_pct      float   100 * saving_ms / baseline_ms
flags           str     ``interleaved``, ``remeasured``, ``noisy``, ``outlier`` (> 1.5 x the
                        variant's fastest round; for interleaved cells, its best ratio to
                        the baseline), ``baseline-outlier``, joined by ``;``
widths          str     JSON list of kept channels per edge (random rows; "" otherwise)
==============  ======  ==========================================================
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gator_hw.accounting import network_cost
from gator_hw.atomic import write_json, write_text
from gator_hw.costmodel.gator import write_gator_csv
from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph
from gator_hw.profile.backends import backend_info
from gator_hw.profile.timing import NOISY_REL_IQR, LatencyResult, TimingSpec, device_info
from gator_hw.profile.variants import KINDS, Variant

__all__ = [
    "OUTLIER_RATIO",
    "TABLE_COLUMNS",
    "Cell",
    "build_table",
    "gator_frame",
    "noise_floor",
    "read_table",
    "sidecar_path",
    "summarize",
    "table_metadata",
    "write_tables",
]

#: Tidy table columns and their dtypes, in file order.
TABLE_COLUMNS: dict[str, str] = {
    "variant": "str",
    "kind": "str",
    "round": "int",
    "edge": "int",
    "edge_name": "str",
    "channels": "int",
    "width": "float",
    "kept": "int",
    "flops": "float",
    "params": "float",
    "bytes": "float",
    "n_blocks": "int",
    "median_ms": "float",
    "iqr_ms": "float",
    "rel_iqr": "float",
    "noisy": "bool",
    "baseline_ms": "float",
    "saving_ms": "float",
    "saving_pct": "float",
    "flags": "str",
    "widths": "str",
}

_BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}

#: A cell slower than this many times its variant's fastest round is flagged ``outlier``
#: (a stall or a busy neighbour hit the whole measurement, which its IQR cannot show).
OUTLIER_RATIO: float = 1.5


@dataclass(frozen=True)
class Cell:
    """One finished measurement: a variant in a round, its raw per-call times and flags.

    ``ref_times_s`` are the full net's blocks interleaved with this cell's (empty if the cell
    was not interleaved): the cell's own baseline.
    """

    round: int
    variant: str
    times_s: tuple[float, ...]
    number: int = 1
    flags: tuple[str, ...] = ()
    wall_s: float = 0.0
    ref_times_s: tuple[float, ...] = ()
    session: str = ""  # the profiler process that timed it (a round pairs within one)
    gpu: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # NVML before/after

    @property
    def key(self) -> tuple[int, str, str]:
        """Round, variant and session: a resumed round re-times its baseline in the new one."""
        return (self.round, self.variant, self.session)

    def result(self, spec: TimingSpec) -> LatencyResult:
        """The measurement as a :class:`LatencyResult` of ``spec`` (for this variant)."""
        return LatencyResult(
            spec.for_variant(self.variant), self.times_s, self.number, self.ref_times_s
        )

    def to_json(self) -> dict:
        return {
            "round": self.round,
            "variant": self.variant,
            "times_s": list(self.times_s),
            "number": self.number,
            "flags": list(self.flags),
            "wall_s": self.wall_s,
            "ref_times_s": list(self.ref_times_s),
            "session": self.session,
            "gpu": {k: dict(v) for k, v in self.gpu.items()},
        }

    @classmethod
    def from_json(cls, obj: Mapping) -> Cell:
        return cls(
            int(obj["round"]),
            str(obj["variant"]),
            tuple(float(t) for t in obj["times_s"]),
            int(obj["number"]),
            tuple(str(f) for f in obj.get("flags", ())),
            float(obj.get("wall_s", 0.0)),
            tuple(float(t) for t in obj.get("ref_times_s", ())),
            str(obj.get("session", "")),
            {str(k): {str(a): float(b) for a, b in v.items()}
             for k, v in dict(obj.get("gpu", {})).items()},
        )

    def __str__(self) -> str:
        med = 1e3 * float(np.median(self.times_s))
        flags = f" [{';'.join(self.flags)}]" if self.flags else ""
        return f"round {self.round} {self.variant}: {med:.4g} ms, {len(self.times_s)} blocks{flags}"


# ---------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------
def _variant_columns(graph: HyperGraph, v: Variant) -> dict:
    if v.kind == "edge":
        e = graph.edges[v.edge]
        return dict(
            edge=v.edge,
            edge_name=e.name,
            channels=e.channels,
            width=v.fraction,
            kept=v.widths[v.edge],
            widths="",
        )
    total = sum(e.channels for e in graph.edges)
    return dict(
        edge=-1,
        edge_name="",
        channels=total,
        width=sum(v.widths) / total if total else 1.0,
        kept=sum(v.widths),
        widths=json.dumps(list(v.widths)) if v.kind == "random" else "",
    )


def build_table(
    graph: HyperGraph,
    variants: Sequence[Variant],
    cells: Iterable[Cell],
    spec: TimingSpec,
) -> pd.DataFrame:
    """The tidy table of ``cells`` (see the module docstring), sorted by round then variant order.

    Cells of variants not in ``variants`` are ignored. A cell that is not interleaved pairs
    with the baseline of its round timed in the same session (profiler process: the same
    cudnn choices and clocks); one without such a baseline is dropped. Interleaved cells carry
    their own baseline.
    """
    order = {v.vid: i for i, v in enumerate(variants)}
    by_id = {v.vid: v for v in variants}
    cells = sorted(
        (c for c in cells if c.variant in order), key=lambda c: (c.round, order[c.variant])
    )
    base = {(c.round, c.session): c.result(spec).median_ms for c in cells if c.variant == "full"}
    bpe = _BYTES_PER_ELEMENT[spec.dtype]
    costs = {}
    rows = []
    for c in cells:
        if (c.round, c.session) not in base and not c.ref_times_s:
            continue
        v = by_id[c.variant]
        if v.vid not in costs:
            costs[v.vid] = network_cost(
                graph, v.narrowed(graph), batch=spec.batch, bytes_per_element=bpe
            )
        cost, res = costs[v.vid], c.result(spec)
        b = res.ref_median_ms if c.ref_times_s else base[(c.round, c.session)]
        flags = (["interleaved"] if c.ref_times_s else []) + list(c.flags)
        flags += ["noisy"] if res.noisy else []
        rows.append(
            dict(
                variant=v.vid,
                kind=v.kind,
                round=c.round,
                **_variant_columns(graph, v),
                flops=cost.flops,
                params=cost.params,
                bytes=cost.bytes,
                n_blocks=len(c.times_s),
                median_ms=res.median_ms,
                iqr_ms=res.iqr_ms,
                rel_iqr=res.rel_iqr,
                noisy=res.noisy,
                baseline_ms=b,
                saving_ms=b - res.median_ms,
                saving_pct=100.0 * (b - res.median_ms) / b,
                flags=";".join(dict.fromkeys(flags)),
            )
        )
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return _typed(_flag_outliers(df), "profile table")


def _add_flag(flags: pd.Series, mask: pd.Series, flag: str) -> pd.Series:
    joined = flags.where(flags == "", flags + ";") + flag
    return flags.where(~mask, joined)


def _interleaved(df: pd.DataFrame) -> pd.Series:
    return df["flags"].str.split(";").apply(lambda f: "interleaved" in f)


def _flag_outliers(df: pd.DataFrame) -> pd.DataFrame:
    """Flag ``outlier`` cells (> OUTLIER_RATIO x their variant's fastest round; interleaved
    cells: x its best ratio to the baseline) and ``baseline-outlier`` cells (not interleaved,
    and their round's baseline is an outlier)."""
    if df.empty:
        return df
    paired = _interleaved(df)
    value = df["median_ms"].where(~paired, df["median_ms"] / df["baseline_ms"])
    best = value.groupby(df["variant"]).transform("min")
    outlier = value > OUTLIER_RATIO * best
    bad_rounds = set(df.loc[outlier & (df["kind"] == "baseline"), "round"])
    bad_base = df["round"].isin(bad_rounds) & (df["kind"] != "baseline") & ~paired
    df = df.copy()
    df["flags"] = _add_flag(df["flags"], outlier, "outlier")
    df["flags"] = _add_flag(df["flags"], bad_base, "baseline-outlier")
    return df


def gator_frame(table: pd.DataFrame, fraction: float = 0.5) -> pd.DataFrame | None:
    """The table in the original GATOR form: label 0 = full net, label k = edge k-1 at 50 %.

    One row per round (``time_ms`` = that round's median; for an interleaved cell, its ratio to
    its own baseline times the median baseline, so machine states cancel as they did in the
    cell). ``flops_pct`` = 100 * FLOPs(variant) / FLOPs(full). Returns ``None`` when some edge
    has no probe at ``fraction`` (not profiled, or an edge too narrow to halve).
    """
    base = table[table["kind"] == "baseline"]
    probes = table[(table["kind"] == "edge") & np.isclose(table["width"], fraction)]
    if base.empty:
        return None
    paired = _interleaved(probes)
    ratio = probes["median_ms"] / probes["baseline_ms"] * float(base["median_ms"].median())
    probes = probes.assign(median_ms=probes["median_ms"].where(~paired, ratio))
    full_flops = float(base["flops"].iloc[0])
    n_edges = int(probes["edge"].max()) + 1 if len(probes) else 0
    edges_present = set(probes["edge"].astype(int))
    if n_edges == 0 or edges_present != set(range(n_edges)):
        return None
    parts = [pd.DataFrame({"label": 0, "flops_pct": 100.0, "time_ms": base["median_ms"]})]
    for e in range(n_edges):
        rows = probes[probes["edge"] == e]
        parts.append(
            pd.DataFrame(
                {
                    "label": e + 1,
                    "flops_pct": 100.0 * float(rows["flops"].iloc[0]) / full_flops,
                    "time_ms": rows["median_ms"],
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)
    return out.astype({"label": "int64", "flops_pct": "float64", "time_ms": "float64"})


def noise_floor(table: pd.DataFrame) -> float:
    """Median relative IQR of the baseline cells: differences below it are noise."""
    base = table.loc[table["kind"] == "baseline", "rel_iqr"]
    return float(base.median()) if len(base) else float("nan")


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: medians over rounds, sorted by time saved (largest first).

    Cells flagged ``outlier`` or ``baseline-outlier`` are left out when the variant has
    other cells.

    Columns: variant, kind, edge, edge_name, channels, kept, width, flops_saved_pct,
    median_ms, saving_ms, saving_pct, rel_iqr (worst round), noisy_rounds, rounds.
    """
    if table.empty:
        return pd.DataFrame()
    full_flops = float(table.loc[table["kind"] == "baseline", "flops"].iloc[0])
    clean = ~table["flags"].str.contains("outlier")
    has_clean = clean.groupby(table["variant"]).transform("any")
    table = table[clean | ~has_clean]
    grouped = table.groupby("variant", sort=False)
    out = grouped.agg(
        kind=("kind", "first"),
        edge=("edge", "first"),
        edge_name=("edge_name", "first"),
        channels=("channels", "first"),
        kept=("kept", "first"),
        width=("width", "first"),
        flops=("flops", "first"),
        median_ms=("median_ms", "median"),
        saving_ms=("saving_ms", "median"),
        saving_pct=("saving_pct", "median"),
        rel_iqr=("rel_iqr", "max"),
        noisy_rounds=("noisy", "sum"),
        rounds=("round", "nunique"),
    ).reset_index()
    out.insert(7, "flops_saved_pct", 100.0 * (1.0 - out.pop("flops") / full_flops))
    return out.sort_values("saving_ms", ascending=False, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------
# metadata and writing
# ---------------------------------------------------------------------------
def sidecar_path(csv_path: str | Path) -> Path:
    """The JSON sidecar of a tidy table: same name, ``.json``."""
    return Path(csv_path).with_suffix(".json")


def _tf32_flags() -> dict:
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def table_metadata(
    table: pd.DataFrame,
    graph: HyperGraph,
    spec: TimingSpec,
    *,
    settings: Mapping,
    extra: Mapping | None = None,
) -> dict:
    """Everything the numbers depend on, for the JSON sidecar.

    ``settings`` holds the profile options (widths, round_to, random_nets, rounds, seed);
    ``extra`` anything else to record (regime check, files, wall time, warnings).
    """
    from gator_hw import __version__

    base = table[table["kind"] == "baseline"]
    medians = base["median_ms"].to_numpy(dtype=float)
    drift = float((medians.max() - medians.min()) / np.median(medians)) if len(medians) else None
    meta = {
        "format": "gator-hw-profile",
        "format_version": 1,
        "gator_hw_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": spec.model,
        "input_size": spec.input_size,
        "batch": spec.batch,
        "dtype": spec.dtype,
        "channels_last": spec.channels_last,
        "layout": "channels_last" if spec.channels_last else "contiguous",
        "threads": spec.threads,
        "regime": spec.regime,
        "backend": spec.backend,
        "cuda_graphs": spec.regime == "cuda-graph",
        "cudnn_benchmark": spec.cudnn_benchmark,
        "tf32": spec.tf32,
        "tf32_flags": _tf32_flags(),
        "device": device_info(spec),
        "timing_spec": spec.key(),
        **dict(settings),
        "n_edges": graph.n_edges,
        "edges": [[e.name, e.channels] for e in graph.edges],
        "noisy_rel_iqr": NOISY_REL_IQR,
        "noise_floor": noise_floor(table),
        "noise_floor_max": float(base["rel_iqr"].max()) if len(base) else None,
        "baseline_median_ms": float(np.median(medians)) if len(medians) else None,
        "baseline_drift": drift,
        "cells": int(len(table)),
        "noisy_cells": int(table["noisy"].sum()),
        "remeasured_cells": int(table["flags"].str.contains("remeasured").sum()),
        "outlier_cells": int(table["flags"].str.contains("outlier").sum()),
    }
    info = backend_info(spec)
    if info is not None:
        meta["backend_info"] = info
    meta.update(extra or {})
    return meta


def _csv_text(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def write_tables(
    table: pd.DataFrame, path: str | Path, metadata: Mapping
) -> tuple[Path, Path | None, Path]:
    """Write the tidy CSV, the GATOR CSV (``<stem>_gator.csv``, if every edge has a 50 % probe)
    and the JSON sidecar, each atomically. Returns the three paths (GATOR ``None`` if skipped).
    """
    path = Path(path)
    write_text(path, _csv_text(table))
    gator = gator_frame(table)
    gator_path = None
    if gator is not None:
        gator_path = write_gator_csv(gator, path.with_name(path.stem + "_gator.csv"))
    meta = dict(metadata)
    meta["files"] = {
        "table": path.name,
        "gator": gator_path.name if gator_path else None,
        **dict(meta.get("files", {})),
    }
    json_path = write_json(sidecar_path(path), meta)
    return path, gator_path, json_path


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
_FIX = "re-run `gator-hw profile` to regenerate it"


def _typed(df: pd.DataFrame, source: str) -> pd.DataFrame:
    out = {}
    for col, kind in TABLE_COLUMNS.items():
        s = df[col]
        try:
            if kind == "int":
                vals = pd.to_numeric(s, errors="raise")
                if len(vals) and not np.all(np.asarray(vals, dtype=float) % 1 == 0):
                    raise ValueError("not integers")
                out[col] = vals.astype("int64")
            elif kind == "float":
                out[col] = pd.to_numeric(s, errors="raise").astype("float64")
            elif kind == "bool":
                text = s.astype(str).str.strip().str.lower()
                if not text.isin(["true", "false"]).all():
                    raise ValueError("not True/False")
                out[col] = text == "true"
            else:
                out[col] = s.fillna("").astype(str)
        except (ValueError, TypeError):
            raise GatorError(
                f"{source}: column {col} must hold {kind} values but does not; {_FIX}"
            ) from None
    return pd.DataFrame(out)


def _check_against_graph(df: pd.DataFrame, graph: HyperGraph, source: str) -> None:
    bad_kind = sorted(set(df["kind"]) - set(KINDS))
    if bad_kind:
        raise GatorError(f"{source}: unknown variant kind(s) {bad_kind}; expected {list(KINDS)}")
    if not (df["kind"] == "baseline").any():
        raise GatorError(f"{source} has no baseline rows (variant full); {_FIX}")
    edges = df[df["kind"] == "edge"]
    hint = f"it was not measured on {graph.model_name} @ {graph.input_shape[-1]}px"
    out_of_range = edges[(edges["edge"] < 0) | (edges["edge"] >= graph.n_edges)]
    if len(out_of_range):
        raise GatorError(
            f"{source} names edge {int(out_of_range['edge'].iloc[0])} but "
            f"{graph.model_name} has {graph.n_edges} edges; {hint}: load the matching model"
        )
    for e, grp in edges.groupby("edge"):
        ref = graph.edges[int(e)]
        name, ch = grp["edge_name"].iloc[0], int(grp["channels"].iloc[0])
        if name != ref.name or ch != ref.channels:
            raise GatorError(
                f"{source}: edge {int(e)} is {name} with {ch} channels, but in "
                f"{graph.model_name} it is {ref.name} with {ref.channels}; {hint}: load the "
                "matching model"
            )
        if ((grp["kept"] < 1) | (grp["kept"] > ch)).any():
            raise GatorError(f"{source}: edge {int(e)} keeps channels outside 1..{ch}; {_FIX}")
    full = [e.channels for e in graph.edges]
    for text in df.loc[df["kind"] == "random", "widths"]:
        try:
            widths = json.loads(text)
        except json.JSONDecodeError:
            raise GatorError(f"{source}: a random-net widths cell is not JSON; {_FIX}") from None
        if not isinstance(widths, list) or len(widths) != len(full):
            raise GatorError(
                f"{source}: a random net lists {len(widths) if isinstance(widths, list) else '?'}"
                f" edge widths but {graph.model_name} has {graph.n_edges} edges; {hint}"
            )
        if any(not (1 <= int(w) <= c) for w, c in zip(widths, full, strict=True)):
            raise GatorError(f"{source}: a random net's widths exceed {graph.model_name}'s; {hint}")


def _check_sidecar(path: Path, graph: HyperGraph, source: str) -> None:
    side = sidecar_path(path)
    if not side.is_file():
        return
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GatorError(
            f"sidecar {side} of {source} is corrupt ({type(exc).__name__}); {_FIX}"
        ) from None
    if not isinstance(meta, dict):
        raise GatorError(f"sidecar {side} of {source} is not a JSON object; {_FIX}")
    if meta.get("n_edges") not in (None, graph.n_edges):
        raise GatorError(
            f"{source} was measured on {meta.get('model')} with {meta['n_edges']} edges, but "
            f"{graph.model_name} has {graph.n_edges}; load the model the table was made for"
        )
    size = meta.get("input_size")
    if size is not None and graph.input_shape and size != graph.input_shape[-1]:
        raise GatorError(
            f"{source} was measured at {size}x{size} input but the graph is at "
            f"{graph.input_shape[-1]}x{graph.input_shape[-1]}; load it with --input-size {size}"
        )


def read_table(path: str | Path, graph: HyperGraph) -> pd.DataFrame:
    """Load a tidy profile table and check it against ``graph``.

    Parameters
    ----------
    path : the tidy CSV written by ``gator-hw profile``.
    graph : the hypergraph of the model the table should describe.

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`TABLE_COLUMNS` with their dtypes (int64, float64, bool, str).

    Raises
    ------
    GatorError
        If the file is missing or corrupt, lacks columns, holds values of the wrong type, or
        does not match ``graph`` (edge count, edge names, channel counts, input size).
    """
    path = Path(path)
    source = f"profile table {path}"
    if not path.is_file():
        raise GatorError(f"{source} not found; pass the .csv written by `gator-hw profile`")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GatorError(f"{source} is corrupt ({reason}); {_FIX}") from None
    missing = [c for c in TABLE_COLUMNS if c not in raw.columns]
    if missing:
        raise GatorError(
            f"{source} lacks column(s) {', '.join(missing[:5])}; it is not a gator-hw profile "
            f"table or is damaged; {_FIX}"
        )
    if raw.empty:
        raise GatorError(f"{source} has no rows; {_FIX}")
    df = _typed(raw, source)
    floats = df[["median_ms", "iqr_ms", "baseline_ms", "flops"]].to_numpy()
    if not np.isfinite(floats).all() or (df["median_ms"] <= 0).any():
        raise GatorError(f"{source} holds non-finite or non-positive times; {_FIX}")
    _check_against_graph(df, graph, source)
    _check_sidecar(path, graph, source)
    return df
