"""Running a profile: rounds of interleaved variants, resumable cell by cell.

Protocol. Every round times the full-width baseline first and then every other variant in a
seeded shuffled order, so slow drifts (clock, temperature, neighbours) hit all variants alike;
a variant's saving is its paired delta against the baseline of its own round. On CPU (where a
shared machine can switch speed within a round) each variant's blocks are also interleaved
with blocks of the full net, and the saving is paired within the cell instead
(``spec.interleave``). A cell (one variant in one round) whose noise exceeds
``NOISY_REL_IQR`` is re-measured once right away and keeps the less noisy of its two
measurements, flagged ``remeasured`` (and ``noisy`` if that one still is). Summaries take
medians over rounds, so one disturbed round does not move them.

Resume. Each finished cell is appended to ``<stem>.cells.json`` beside the table, rewritten
atomically after every cell; Ctrl-C or a crash loses at most the cell being timed. A re-run
whose timing protocol matches reuses every finished cell with the same round and variant id
(so adding rounds, widths or random nets times only what is new) and rewrites the tables.

On CUDA the baseline is also timed once in the other regime (eager vs graph replay); a
difference above 10 % is reported, since eager timings of launch-bound nets hide savings.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gator_hw.atomic import write_json
from gator_hw.errors import GatorError
from gator_hw.models import default_input_size
from gator_hw.network import Network, load_network
from gator_hw.profile.backends import backend_info
from gator_hw.profile.device import gpu_state
from gator_hw.profile.spec import TimingOptions
from gator_hw.profile.tables import (
    OUTLIER_RATIO,
    Cell,
    build_table,
    gator_frame,
    summarize,
    table_metadata,
    write_tables,
)
from gator_hw.profile.timing import (
    NOISY_REL_IQR,
    LatencyResult,
    TimingSpec,
    device_slug,
    time_model,
)
from gator_hw.profile.variants import Variant, baseline_variant, build_variants, parse_widths
from gator_hw.slim import slim

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "EAGER_GRAPH_TOLERANCE",
    "Measure",
    "ProfileRequest",
    "ProfileResult",
    "cells_path",
    "default_out",
    "run",
    "schedule",
]

#: Relative difference between eager and graph-replay baselines above which the run warns.
EAGER_GRAPH_TOLERANCE: float = 0.10

#: ``measure(model, spec) -> LatencyResult``; :func:`time_model` unless a test swaps it.
Measure = Callable[..., LatencyResult]

_CELLS_FORMAT = "gator-hw-profile-cells"

#: Protocol fields added after cells files were first written: their value then.
_PROTOCOL_DEFAULTS = {"backend": "torch", "runtime": None}


@dataclass(frozen=True)
class ProfileRequest:
    """What to profile: the timing protocol plus which variants, how many rounds, the seed.

    Build it with :meth:`create`, which validates user options once.
    """

    spec: TimingSpec
    fractions: tuple[float, ...] = (0.5,)
    round_to: int | None = None
    random_nets: int = 0
    rounds: int = 3
    seed: int = 0
    num_classes: int = 1000
    random_min_keep: float | None = None

    @classmethod
    def create(
        cls,
        model: str,
        timing: TimingOptions | None = None,
        *,
        widths: str | float | Sequence[float] = "0.5",
        round_to: int | None = None,
        random_nets: int = 0,
        rounds: int = 3,
        seed: int = 0,
        num_classes: int = 1000,
        random_min_keep: float | None = None,
        **timing_options,
    ) -> ProfileRequest:
        """Validate user options and resolve the device (GatorError on any mistake).

        ``timing`` holds the timing options (:class:`TimingOptions`); they may also be given
        as keywords (``device="cpu", batch=8, ...``).
        """
        if timing is None:
            timing = TimingOptions(**timing_options)
        elif timing_options:
            raise TypeError("pass timing options either as TimingOptions or as keywords")
        fractions = parse_widths(widths)
        if timing.batch < 1:
            raise GatorError(f"--batch-size must be >= 1, got {timing.batch}")
        if rounds < 1:
            raise GatorError(f"--rounds must be >= 1, got {rounds}")
        if random_nets < 0:
            raise GatorError(f"--random-nets must be >= 0, got {random_nets}")
        if random_min_keep is not None and not 0.0 < random_min_keep <= 1.0:
            raise GatorError(
                f"--random-min-keep must be in (0, 1], got {random_min_keep}; e.g. 0.05"
            )
        if round_to is not None and round_to < 1:
            raise GatorError(f"--round-to must be >= 1 channel, got {round_to}")
        if timing.input_size is not None and timing.input_size < 1:
            raise GatorError(
                f"--input-size must be a positive number of pixels, got {timing.input_size}")
        spec = timing.spec(model, None if timing.input_size else default_input_size(model))
        return cls(spec, fractions, round_to, random_nets, rounds, seed, num_classes,
                   random_min_keep)

    def settings(self) -> dict:
        """The profile options as plain data (recorded in the sidecar)."""
        return {
            "widths": list(self.fractions),
            "round_to": self.round_to,
            "random_nets": self.random_nets,
            "rounds": self.rounds,
            "seed": self.seed,
            "num_classes": self.num_classes,
            **({} if self.random_min_keep is None else
               {"random_min_keep": self.random_min_keep}),
        }

    def __str__(self) -> str:
        return (
            f"profile {self.spec.model} b{self.spec.batch} {self.spec.dtype} on "
            f"{self.spec.device}: widths {list(self.fractions)}, {self.random_nets} random nets, "
            f"{self.rounds} rounds"
        )


@dataclass(frozen=True)
class ProfileResult:
    """What a profile run produced: the table, its files and the run's health."""

    table: pd.DataFrame
    metadata: dict
    table_path: Path
    gator_path: Path | None
    json_path: Path
    cells_path: Path
    timed: int
    reused: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def noise_floor(self) -> float:
        return float(self.metadata["noise_floor"])

    @property
    def regime(self) -> str:
        return str(self.metadata["regime"])

    def summary(self) -> pd.DataFrame:
        """Per-variant medians over rounds, largest saving first."""
        return summarize(self.table)

    def __str__(self) -> str:
        return (
            f"{self.table_path}: {len(self.table)} cells ({self.timed} timed, {self.reused} "
            f"reused), {self.regime}, noise floor {100 * self.noise_floor:.2f} %"
        )


def default_out(spec: TimingSpec) -> Path:
    """``profiles/<device-slug>/<model>[_<size>px]_b<batch>_<dtype>[_cl].csv``.

    The input size is in the name when it is not the model's own (224, 299, 32).
    """
    from gator_hw.models import default_input_size

    name = spec.model
    if ":" in name:  # file.py:factory -> file_factory
        path, factory = name.rsplit(":", 1)
        name = f"{Path(path).stem}_{factory}"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    cl = "_cl" if spec.channels_last else ""
    size = "" if spec.input_size == default_input_size(spec.model) else f"_{spec.input_size}px"
    return Path("profiles") / device_slug(spec) / (
        f"{name}{size}_b{spec.batch}_{spec.dtype}{cl}.csv")


def cells_path(table_path: str | Path) -> Path:
    """The resume file of a table: ``<stem>.cells.json`` (raw times of every finished cell)."""
    p = Path(table_path)
    return p.with_name(p.stem + ".cells.json")


def schedule(variants: Sequence[Variant], rounds: int, seed: int) -> list[tuple[int, Variant]]:
    """(round, variant) in timing order: each round the baseline, then the rest shuffled."""
    out: list[tuple[int, Variant]] = []
    for r in range(rounds):
        rest = list(variants[1:])
        random.Random(f"{seed}:{r}").shuffle(rest)
        out += [(r, variants[0])] + [(r, v) for v in rest]
    return out


# ---------------------------------------------------------------------------
# the resume file
# ---------------------------------------------------------------------------
class _Store:
    """Finished cells of one protocol, persisted atomically after every addition."""

    def __init__(self, path: Path, spec: TimingSpec, num_classes: int) -> None:
        self.path = path
        # the runtime's version and session / builder settings too: a resumed ORT or TensorRT
        # profile never pairs cells timed under another runtime build or option set
        self.protocol = {**spec.key(), "num_classes": num_classes,
                         "runtime": backend_info(spec)}
        self.cells: dict[tuple[int, str], Cell] = {}
        self.checks: dict = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
            ok = isinstance(obj, dict) and obj.get("format") == _CELLS_FORMAT
            cells = [Cell.from_json(c) for c in obj["cells"]] if ok else []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise GatorError(
                f"resume file {self.path} is corrupt; delete it to start the profile over"
            )
        old = {**_PROTOCOL_DEFAULTS, **obj.get("protocol", {})}
        diff = [k for k in self.protocol if old.get(k) != self.protocol[k]]
        if diff:
            shown = ", ".join(f"{k} {old.get(k)!r} -> {self.protocol[k]!r}" for k in diff[:3])
            raise GatorError(
                f"{self.path} holds cells timed with other settings ({shown}); pass another "
                "--out, or delete it to start over"
            )
        self.cells = {c.key: c for c in cells}
        self.checks = dict(obj.get("checks", {}))

    def add(self, cell: Cell) -> None:
        self.cells[cell.key] = cell
        self.save()

    def done(self, rnd: int, vid: str, session: str | None = None) -> bool:
        """Whether the store holds variant ``vid`` of round ``rnd`` (timed in ``session``)."""
        return any(c.round == rnd and c.variant == vid and session in (None, c.session)
                   for c in self.cells.values())

    def cell(self, rnd: int, vid: str) -> Cell:
        """The latest cell of variant ``vid`` in round ``rnd``."""
        return [c for c in self.cells.values() if c.round == rnd and c.variant == vid][-1]

    def save(self) -> None:
        write_json(
            self.path,
            {
                "format": _CELLS_FORMAT,
                "version": 1,
                "protocol": self.protocol,
                "checks": self.checks,
                "cells": [c.to_json() for c in self.cells.values()],
            },
        )


# ---------------------------------------------------------------------------
# measuring cells
# ---------------------------------------------------------------------------
def _build(net: Network, variant: Variant):
    graph = net.graph
    return slim(net.model, graph, graph.first_channels_plan(variant.narrowed(graph)))


def _clock_range(cells: Iterable[Cell]) -> list[float] | None:
    """Lowest and highest SM clock NVML read around the cells (None without NVML)."""
    clocks = [side["sm_clock_mhz"] for c in cells for side in c.gpu.values()
              if "sm_clock_mhz" in side]
    return [min(clocks), max(clocks)] if clocks else None


def _todo(plan: list[tuple[int, Variant]], store: _Store, session: str, interleave: bool
          ) -> list[tuple[int, Variant]]:
    """The cells to time now: every unfinished one, and, where cells pair with their round's
    baseline (not interleaved), that baseline again first in each round left unfinished by an
    earlier process (its cudnn choices and clocks were another's)."""
    todo = [(r, v) for r, v in plan if not store.done(r, v.vid)]
    if interleave:
        return todo
    left = {(r, v.vid) for r, v in todo if v.kind != "baseline"}
    open_rounds = {r for r, _ in left}

    def wanted(r: int, v: Variant) -> bool:
        if v.kind == "baseline":
            return r in open_rounds and not store.done(r, v.vid, session)
        return (r, v.vid) in left

    return [(r, v) for r, v in plan if wanted(r, v)]


def _measure_cell(
    net: Network, variant: Variant, rnd: int, spec: TimingSpec, measure: Measure,
    reference: nn.Module | None = None, session: str = "",
) -> Cell:
    """Time one cell; interleaved with ``reference`` (the full net) unless it is the baseline."""
    t0 = time.perf_counter()
    on_gpu = spec.torch_device.type == "cuda"
    before = gpu_state(spec.torch_device) if on_gpu else {}
    model = _build(net, variant)
    vspec = spec.for_variant(variant.vid)
    kw = {"reference": reference} if reference is not None and variant.kind != "baseline" else {}
    res = measure(model, vspec, **kw)
    flags: tuple[str, ...] = ()
    if res.noise > NOISY_REL_IQR:
        again = measure(model, vspec, **kw)
        res = min(res, again, key=lambda m: m.noise)
        flags = ("remeasured",)
    after = gpu_state(spec.torch_device) if before else {}
    gpu = {"before": before, "after": after} if before and after else {}
    return Cell(rnd, variant.vid, res.times_s, res.number, flags, time.perf_counter() - t0,
                res.ref_times_s, session, gpu)


def _preflight(net: Network, spec: TimingSpec) -> None:
    """Run the full net once so an unsupported dtype/device fails with one clear line."""
    import torch

    model = _build(net, baseline_variant(net.graph))
    model = model.to(device=spec.torch_device, dtype=spec.torch_dtype).eval()
    x = torch.zeros((1, 3, spec.input_size, spec.input_size), dtype=spec.torch_dtype)
    try:
        with torch.inference_mode():
            model(x.to(spec.torch_device))
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise GatorError(
            f"{spec.model} does not run in {spec.dtype} on {spec.device} ({first}); "
            "try --dtype float32"
        ) from None


def _regime_check(
    net: Network, spec: TimingSpec, store: _Store, measure: Measure
) -> tuple[dict, list[str]]:
    """On CUDA: the baseline timed eager and with graph replay; warn when they differ > 10 %."""
    if spec.regime == "cpu":
        return {}, []
    if "eager_ms" not in store.checks:
        base = baseline_variant(net.graph)
        for regime in ("cuda-graph", "cuda-eager"):
            res = measure(_build(net, base), dataclasses.replace(spec, regime=regime))
            key = "graph_ms" if regime == "cuda-graph" else "eager_ms"
            store.checks[key] = res.median_ms
            store.checks[key.replace("_ms", "_rel_iqr")] = res.rel_iqr
        store.save()
    checks = dict(store.checks)
    ratio = checks["eager_ms"] / checks["graph_ms"]
    checks["eager_over_graph"] = ratio
    warnings = []
    if abs(ratio - 1.0) > EAGER_GRAPH_TOLERANCE:
        launch = (
            " (eager is launch-bound: narrowing layers saves little there)" if ratio > 1 else ""
        )
        warnings.append(
            f"eager and CUDA-graph baselines differ by {100 * (ratio - 1):+.1f} % "
            f"({checks['eager_ms']:.3f} vs {checks['graph_ms']:.3f} ms){launch}; "
            f"this table measured {spec.regime}"
        )
    return checks, warnings


def _pair_noise(cells: Iterable[Cell], spec: TimingSpec) -> float | None:
    """Median over interleaved cells of the rel. IQR of their ratios to the baseline."""
    noise = [c.result(spec).noise for c in cells if c.ref_times_s]
    return float(statistics.median(noise)) if noise else None


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[cell]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def _regime_text(spec: TimingSpec, checks: Mapping) -> str:
    if spec.regime == "cpu" and spec.interleave:
        return f"cpu: blocks interleaved with the full net (ABBA), {spec.threads} threads"
    if spec.regime == "cpu":
        return f"cpu: torch.utils.benchmark, {spec.threads} threads"
    text = "CUDA-graph replay" if spec.regime == "cuda-graph" else "eager CUDA calls"
    if "eager_over_graph" in checks:
        text += f" (eager / graph baseline = {checks['eager_over_graph']:.3f})"
    return text


def run(
    request: ProfileRequest,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    measure: Measure | None = None,
    on_cell: Callable[[Cell, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Profile ``request`` and write its tables; resume from ``<stem>.cells.json`` if present.

    Parameters
    ----------
    request : what to time (see :class:`ProfileRequest`).
    out : tidy CSV path; default :func:`default_out`. The GATOR CSV (``<stem>_gator.csv``,
        written when every edge has a 0.5 probe), sidecar (``<stem>.json``) and resume file
        (``<stem>.cells.json``) go beside it.
    progress : show a progress bar with ETA on stderr.
    measure : timing function ``measure(model, spec) -> LatencyResult``; default
        :func:`~gator_hw.profile.timing.time_model`.
    on_cell : called as ``on_cell(cell, done, total)`` after each newly timed cell is saved.
    log : where to report an interruption (e.g. a console's print).

    Returns
    -------
    ProfileResult

    Raises
    ------
    GatorError
        For an unusable output path, a corrupt or incompatible resume file, or a model that
        does not run in the requested dtype on the device.
    """
    t_start = time.perf_counter()
    measure = measure or time_model
    spec = request.spec
    path = Path(out) if out is not None else default_out(spec)
    if path.suffix == "":
        path = path.with_suffix(".csv")
    if path.suffix != ".csv":
        raise GatorError(f"--out {path} must end in .csv (the sidecars are written beside it)")
    net = load_network(spec.model, input_size=spec.input_size, num_classes=request.num_classes)
    variants = build_variants(
        net.graph,
        request.fractions,
        round_to=request.round_to,
        random_nets=request.random_nets,
        seed=request.seed,
        random_min_keep=request.random_min_keep,
    )
    store = _Store(cells_path(path), spec, request.num_classes)
    plan = schedule(variants, request.rounds, request.seed)
    session = uuid.uuid4().hex[:12]
    todo = _todo(plan, store, session, spec.interleave)
    reused = len(plan) - sum(1 for r, v in todo if not store.done(r, v.vid))
    if todo:
        _preflight(net, spec)
    checks, warnings = _regime_check(net, spec, store, measure)
    reference = _build(net, baseline_variant(net.graph)) if spec.interleave and todo else None
    timed = 0
    try:
        with _progress(progress) as bar:
            task = bar.add_task(spec.model, total=reused + len(todo), completed=reused, cell="")
            for r, v in todo:
                bar.update(task, cell=f"round {r} {v.vid}")
                cell = _measure_cell(net, v, r, spec, measure, reference, session)
                store.add(cell)
                timed += 1
                bar.advance(task)
                if on_cell is not None:
                    on_cell(cell, reused + timed, reused + len(todo))
    except KeyboardInterrupt:
        if log is not None:
            log(
                f"interrupted: {reused + timed} of {len(plan)} cells are saved in {store.path}; "
                "run the same command again to resume"
            )
        raise
    table = build_table(net.graph, variants, store.cells.values(), spec)
    kinds = {v.vid: v.kind for v in variants}
    noisy = table[table["noisy"]]
    warnings += [
        f"round {row.round} {row.variant}: still noisy after re-measuring "
        f"({store.cell(row.round, row.variant).result(spec).noise_text})"
        for row in noisy.itertuples()
    ]
    extra = {
        "regime_note": _regime_text(spec, checks),
        "regime_check": checks or None,
        "warnings": warnings,
        "files": {"cells": store.path.name},
        "wall_s": round(time.perf_counter() - t_start, 3),
        "timed_cells": timed,
        "reused_cells": reused,
        "pair_noise_floor": _pair_noise(store.cells.values(), spec),
        "sm_clock_mhz": _clock_range(store.cells.values()),
        "cell_wall_s": {
            kind: round(
                sum(c.wall_s for c in store.cells.values()
                    if c.variant in kinds and kinds[c.variant] == kind),
                3,
            )
            for kind in ("baseline", "edge", "random")
        },
    }
    outliers = int(table["flags"].str.contains("outlier").sum())
    if outliers:
        hint = (
            "; on a shared CPU --threads 1 avoids thread-pool stalls"
            if spec.regime == "cpu" and spec.threads > 1
            else ""
        )
        warnings.append(
            f"{outliers} cells ran > {OUTLIER_RATIO}x slower than their variant's best round "
            "or were paired with such a baseline (a stall or a busy machine); summaries skip "
            f"them; add --rounds for more clean rounds{hint}"
        )
    if 0.5 in request.fractions and gator_frame(table) is None:
        warnings.append("no GATOR CSV: some edge has no 50 % probe (too narrow to halve)")
    meta = table_metadata(table, net.graph, spec, settings=request.settings(), extra=extra)
    table_path, gator_path, json_path = write_tables(table, path, meta)
    return ProfileResult(
        table, meta, table_path, gator_path, json_path, store.path, timed, reused, tuple(warnings)
    )
