"""The original GATOR latency multipliers, computed from its timing tables (the baseline).

The original code timed ResNet-50 once with every hyperedge at full width (row label 0)
and once per hyperedge ``e`` with only that edge halved (row label ``e + 1``), several runs
each, and wrote a CSV::

    edge (layer) removed, flops cost percentage, run time
     0, 100.0000,  14.1511
     1,  97.6369,  13.3538
    ...

From it, one multiplier per hyperedge follows (see :func:`gator_multipliers`); those are the
``edge_multipliers`` of the published ``resnet_50_flops_rel_timing_config_batch_*.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from gator_hw.atomic import write_text
from gator_hw.config import GatingConfig
from gator_hw.errors import GatorError

__all__ = [
    "GATOR_COLUMNS",
    "OUTLIER_K",
    "gator_config_from_table",
    "gator_multipliers",
    "outlier_filter",
    "read_gator_csv",
    "write_gator_csv",
]

#: Header of the original timing table, in order.
GATOR_COLUMNS: tuple[str, str, str] = (
    "edge (layer) removed",
    "flops cost percentage",
    "run time",
)

#: Outlier threshold of the original recipe, in standard deviations.
OUTLIER_K: float = 1.5

#: Tidy column names returned by :func:`read_gator_csv`.
_TIDY = ("label", "flops_pct", "time_ms")

#: Characters stripped from cells besides ordinary whitespace (the published batch-32
#: table ends with a line holding only a zero-width space; files may start with a BOM).
_INVISIBLE = "\u200b\ufeff"


def _strip(cell: str) -> str:
    return cell.strip().strip(_INVISIBLE).strip()


def _check_table(df: pd.DataFrame, source: str) -> None:
    """Raise a GatorError unless ``df`` is a valid tidy timing table.

    Checks: columns ``label``, ``flops_pct``, ``time_ms``; at least one row; integer labels
    contiguous from 0 (the baseline) to E; finite FLOPs percentages, the same on every row
    of a label; finite, positive times.
    """
    missing = [c for c in _TIDY if c not in df.columns]
    if missing:
        raise GatorError(
            f"{source} lacks column(s) {', '.join(missing)}; expected columns {', '.join(_TIDY)}"
        )
    if len(df) == 0:
        raise GatorError(f"{source} has no data rows; time the full net (label 0) and each edge")
    labels = df["label"].to_numpy()
    if labels.dtype.kind not in "iu":
        raise GatorError(f"{source}: column label must hold integers; write labels as 0, 1, 2, ...")
    flops = df["flops_pct"].to_numpy(dtype=float)
    times = df["time_ms"].to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(flops))
    if bad.size:
        raise GatorError(
            f"{source}: data row {bad[0] + 1} has a non-finite flops cost percentage; "
            "rewrite it as a number"
        )
    bad = np.flatnonzero(~np.isfinite(times) | (times <= 0))
    if bad.size:
        raise GatorError(
            f"{source}: data row {bad[0] + 1} has run time {times[bad[0]]!r}; run times must be "
            "finite and > 0 ms"
        )
    present = set(int(x) for x in labels)
    if 0 not in present:
        raise GatorError(
            f"{source} has no baseline rows (label 0); time the full net and add those rows"
        )
    top = max(present)
    gaps = sorted(set(range(top + 1)) - present)
    extra = sorted(x for x in present if x < 0)
    if gaps or extra:
        shown = ", ".join(map(str, (extra + gaps)[:5]))
        raise GatorError(
            f"{source}: labels must be contiguous 0..{top} (0 = full net, k = edge k-1 halved) "
            f"but these are missing or invalid: {shown}; re-time the missing edges"
        )
    spread = df.groupby("label")["flops_pct"].agg(lambda s: s.max() - s.min())
    uneven = spread[spread > 0]
    if len(uneven):
        raise GatorError(
            f"{source}: label {int(uneven.index[0])} has different flops cost percentages on "
            "its rows; every run of one label must report the same value"
        )


def read_gator_csv(path: str | Path) -> pd.DataFrame:
    """Read an original GATOR timing table.

    Parameters
    ----------
    path : str or Path
        CSV with header ``edge (layer) removed, flops cost percentage, run time``;
        cells may have leading spaces, blank lines are ignored.

    Returns
    -------
    pandas.DataFrame
        One row per run, in file order, with columns ``label`` (int64; 0 = full net,
        k >= 1 = hyperedge k-1 halved), ``flops_pct`` (float64; FLOPs of that net in
        percent of the full net) and ``time_ms`` (float64; run time in ms).

    Raises
    ------
    GatorError
        On a missing file, an empty table, a missing or renamed column, a non-numeric cell
        (the message names the line), no baseline rows, or labels not contiguous 0..E.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GatorError(
            f"timing table {path} not found; pass the path of a GATOR timing CSV"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GatorError(f"cannot read timing table {path} ({exc}); check the path") from None

    rows = [
        (lineno, [_strip(c) for c in cells])
        for lineno, cells in enumerate(csv.reader(io.StringIO(text)), start=1)
    ]
    rows = [(n, cells) for n, cells in rows if any(cells)]
    if not rows:
        raise GatorError(
            f"timing table {path} is empty; expected the header "
            f"'{', '.join(GATOR_COLUMNS)}' and one row per run"
        )
    _, header = rows[0]
    if tuple(header) != GATOR_COLUMNS:
        missing = [c for c in GATOR_COLUMNS if c not in header]
        what = f"lacks column(s) {', '.join(map(repr, missing))}" if missing else "has columns"
        raise GatorError(
            f"timing table {path} {what} (header {header!r}); expected exactly "
            f"'{', '.join(GATOR_COLUMNS)}'"
        )
    if len(rows) == 1:
        raise GatorError(
            f"timing table {path} has a header but no data rows; time the full net "
            "(label 0) and each edge"
        )

    labels: list[int] = []
    flops: list[float] = []
    times: list[float] = []
    for lineno, cells in rows[1:]:
        if len(cells) != len(GATOR_COLUMNS):
            raise GatorError(
                f"timing table {path} line {lineno} has {len(cells)} cells, expected "
                f"{len(GATOR_COLUMNS)}; fix that row"
            )
        values: list[float] = []
        for name, cell in zip(GATOR_COLUMNS, cells, strict=True):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise GatorError(
                    f"timing table {path} line {lineno}: {name!r} is {cell!r}, not a finite "
                    "number; fix that row"
                )
            values.append(value)
        if not values[0].is_integer():
            raise GatorError(
                f"timing table {path} line {lineno}: label {cells[0]!r} is not an integer; "
                "labels are 0 (full net) or k (edge k-1 halved)"
            )
        labels.append(int(values[0]))
        flops.append(values[1])
        times.append(values[2])

    df = pd.DataFrame(
        {
            "label": np.asarray(labels, dtype=np.int64),
            "flops_pct": np.asarray(flops, dtype=np.float64),
            "time_ms": np.asarray(times, dtype=np.float64),
        }
    )
    _check_table(df, f"timing table {path}")
    return df


def _fmt(x: float) -> str:
    """Format like the original (``%8.4f``) unless that would lose precision."""
    short = f"{x:8.4f}"
    return short if float(short) == x else f"{x!r:>8}"


def write_gator_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a tidy timing table in the original GATOR CSV format, atomically.

    Values are written as ``%8.4f`` like the original, or at full precision when four
    decimals would change them, so ``read_gator_csv(write_gator_csv(df, p))`` equals ``df``.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``label``, ``flops_pct``, ``time_ms`` as returned by :func:`read_gator_csv`.
    path : str or Path
        Destination file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    GatorError
        If ``df`` is not a valid timing table.
    """
    _check_table(df, "timing table to write")
    lines = [", ".join(GATOR_COLUMNS)]
    for label, flops, time in zip(df["label"], df["flops_pct"], df["time_ms"], strict=True):
        lines.append(f"{int(label):2d}, {_fmt(float(flops))}, {_fmt(float(time))}")
    return write_text(path, "\n".join(lines) + "\n")


def outlier_filter(x: np.ndarray, k: float = OUTLIER_K) -> np.ndarray:
    """Drop outliers once: keep the values with ``|x - mean| / std < k``.

    ``std`` is the population standard deviation (``ddof=0``). If it is 0 every value is
    kept. The filter is applied a single time, not repeated until nothing changes.
    For ``k > 1`` at least one value always survives (the mean squared z-score is 1).

    Parameters
    ----------
    x : numpy.ndarray
        1-D array of measurements.
    k : float
        Threshold in standard deviations; must be > 1.

    Returns
    -------
    numpy.ndarray
        The kept values, in their original order.

    Raises
    ------
    GatorError
        If ``k <= 1`` or ``x`` is empty.
    """
    x = np.asarray(x, dtype=float).ravel()
    if not k > 1:
        raise GatorError(f"outlier threshold k must be > 1, got {k}; use 1.5 as the original")
    if x.size == 0:
        raise GatorError("cannot filter an empty set of runs; time each variant at least once")
    std = x.std(ddof=0)
    if std == 0:
        return x.copy()
    return x[np.abs(x - x.mean()) / std < k]


def gator_multipliers(df: pd.DataFrame) -> np.ndarray:
    """Compute the original GATOR latency multipliers from a timing table.

    For each hyperedge e (row label e + 1)::

        T0    = mean(outlier_filter(baseline run times))      # label 0
        T_e   = mean(outlier_filter(run times of label e+1))
        dT_e% = 100 * (T0 - T_e) / T0                          # time saved, % of full net
        dF_e% = 100 - F_e%                                     # FLOPs saved, % of full net
        mu_e  = dT_e% / dF_e%

    This is the variant that reproduces both published configs
    (``resnet_50_flops_rel_timing_config_batch_{32,8}.json`` from
    ``timinig_resnet_50_edges_{7,9}_runs_batch_{32,8}.csv``) to within 3e-16 relative:
    the 1.5-sigma filter (``ddof=0``) applied **once** to each label's runs separately,
    then the arithmetic **mean** of what is left. Iterating the filter to a fixed point,
    skipping it, taking the median or the minimum all miss by 10 % to 70 %.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy table as returned by :func:`read_gator_csv`.

    Returns
    -------
    numpy.ndarray
        Shape ``(E,)``, float64, the multiplier of each hyperedge in hyperedge order.

    Raises
    ------
    GatorError
        If the table is invalid or an edge has ``dF% <= 0`` (no FLOPs saved).

    Examples
    --------
    Batch 32, edge 7 (layer1 highway): T0 = 49.8512 ms, T_7 = 44.7505 ms,
    dT = 10.2319 %, F_7 = 94.3369 %, so mu_7 = 10.2319 / 5.6631 = 1.80677.
    """
    _check_table(df, "timing table")
    groups = {int(label): g for label, g in df.groupby("label", sort=True)}
    t0 = float(np.mean(outlier_filter(groups[0]["time_ms"].to_numpy())))
    n_edges = max(groups)
    out = np.empty(n_edges, dtype=np.float64)
    for e in range(n_edges):
        g = groups[e + 1]
        t_e = float(np.mean(outlier_filter(g["time_ms"].to_numpy())))
        flops_pct = float(g["flops_pct"].iloc[0])
        d_time = 100.0 * (t0 - t_e) / t0
        d_flops = 100.0 - flops_pct
        if d_flops <= 0:
            raise GatorError(
                f"edge {e} (label {e + 1}) has flops cost percentage {flops_pct} >= 100, so "
                "halving it saves no FLOPs; re-time that edge at half width"
            )
        out[e] = d_time / d_flops
    return out


def gator_config_from_table(path: str | Path, template: GatingConfig | None = None) -> GatingConfig:
    """Build a gating config whose ``edge_multipliers`` come from a GATOR timing table.

    Parameters
    ----------
    path : str or Path
        Timing CSV in the original format (see :func:`read_gator_csv`).
    template : GatingConfig or None
        Source of every other field; ``None`` means ``GatingConfig()`` (flop_factor,
        criteria_weight 0.25, gradient_multiplier 0.2, gate_init_prob 0.995, no
        static_total_cost).

    Returns
    -------
    GatingConfig
        A new config; its provenance is the template's, updated with ``method="gator"``,
        ``table`` (the file name) and ``table_sha256`` (of the file's bytes).

    Raises
    ------
    GatorError
        If the table cannot be read or gives invalid multipliers.
    """
    path = Path(path)
    df = read_gator_csv(path)
    multipliers = gator_multipliers(df)
    template = template if template is not None else GatingConfig()
    provenance = dict(template.provenance)
    provenance.update(
        method="gator",
        table=path.name,
        table_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    return GatingConfig(
        factor_type=template.factor_type,
        criteria_weight=template.criteria_weight,
        gradient_multiplier=template.gradient_multiplier,
        gate_init_prob=template.gate_init_prob,
        static_total_cost=template.static_total_cost,
        edge_multipliers=[float(m) for m in multipliers],
        provenance=provenance,
    )
