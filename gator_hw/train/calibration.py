"""Closed-loop latency: time the kept network where it runs and correct the budget by it.

A cost model fitted on random nets is a few per cent off on the deeply pruned nets a budget
run ends with, so ``--target latency=0.5`` would land wherever the model's error puts it. When
the run trains on the device the latency table was profiled on, the trainer converts the
network the gates keep (as ``convert`` will), times it against the full one with the
profiler's protocol (``bench``'s paired rounds) and moves the predicted ceiling so that the
*measured* ratio meets the target: ``ceiling = target * predicted / measured``, the ratio
pooled over the measurements so far (a geometric mean weighted by how close each measured net
was to the current one: one measurement on a busy host is a few per cent off). It does so when
the schedule first reaches the budget and again half-way through the hold (the second
measurement sees the network the first correction made); the gates then close or re-open
channels to the new ceiling (:func:`~gator_hw.budget.enforce_ceiling`,
:func:`~gator_hw.budget.give_back`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.graph import HyperGraph
from gator_hw.profile.timing import TimingSpec, make_spec

__all__ = ["CALIBRATE_MODES", "CALIBRATION_ROUNDS", "MAX_CORRECTION", "CalibrationPoint",
           "Calibrator", "calibration_spec", "correction", "measure_kept"]

#: ``--calibrate`` values: auto (where the device matches the table's), on (or an error), off.
CALIBRATE_MODES: tuple[str, ...] = ("auto", "on", "off")

#: A correction beyond this factor either way means the table is not this device's: refused.
MAX_CORRECTION = 1.3


@dataclass(frozen=True)
class CalibrationPoint:
    """One measurement of the kept network: its step, predicted and measured latency ratio
    (of the full net), and the ceiling's correction factor that followed (pooled over the
    accepted measurements so far)."""

    step: int
    predicted: float
    measured: float
    spread: tuple[float, float]
    scale: float
    accepted: bool = True  # False: too far from the prediction, the ceiling stayed

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lo, hi = self.spread
        return (f"measured latency ratio {self.measured:.3f} (rounds {lo:.3f}-{hi:.3f}), "
                f"predicted {self.predicted:.3f}: ceiling x{self.scale:.3f}")


def calibration_spec(
    cost_model: Mapping | None, device: torch.device, mode: str = "auto"
) -> tuple[TimingSpec | None, str]:
    """The profile's timing protocol on ``device``, or ``None`` and why calibration is off.

    ``cost_model`` is a config's embedded cost model; its context names the table's model,
    batch, input size, dtype, layout, threads and device. ``mode`` ``"on"`` turns every reason
    to skip into a GatorError.
    """
    if mode not in CALIBRATE_MODES:
        raise GatorError(f"--calibrate must be one of {', '.join(CALIBRATE_MODES)}, got {mode!r}")
    if mode == "off":
        return None, "off (--calibrate off)"
    ctx = dict((cost_model or {}).get("context", {}))
    why = None
    if not cost_model:
        why = "the config has no cost model (make it with make-config from a latency table)"
    elif not all(ctx.get(k) for k in ("model", "batch", "input_size", "device_name")):
        why = "the config's cost model does not record its table's timing protocol; remake it"
    spec = None
    if why is None:
        regime = str(ctx.get("regime") or "")
        spec = make_spec(
            str(ctx["model"]), device=device.type if device.type == "cpu" else str(device),
            batch=int(ctx["batch"]), input_size=int(ctx["input_size"]),
            dtype=str(ctx.get("dtype") or "float32"),
            channels_last=bool(ctx.get("channels_last")), eager=regime == "cuda-eager",
            threads=int(ctx["threads"]) if ctx.get("threads") else None,
            backend=str(ctx.get("backend") or "torch"),
        )  # fmt: skip
        if spec.device_name != ctx["device_name"]:
            why = (f"the latency table was timed on {ctx['device_name']}, this run trains on "
                   f"{spec.device_name}")
            spec = None
    if why is not None and mode == "on":
        raise GatorError(f"--calibrate on: {why}; use --calibrate auto or off")
    return spec, why or f"on ({spec})"


def measure_kept(
    model: nn.Module, graph: HyperGraph, gates: GateSet, spec: TimingSpec, *, rounds: int = 3
) -> tuple[float, tuple[float, float]]:
    """Measured latency ratio (median of ``rounds`` paired rounds) and its range, of the
    network the deterministic gates keep, converted for real, against the full ``model``.

    The gates are detached for the conversion and attached again afterwards; ``model`` and its
    training mode are left as they were.
    """
    from gator_hw.convert import convert
    from gator_hw.evaluate import compare_latency

    was = model.training
    attached = gates.attached
    keep = gates.kept_indices()
    if attached:
        gates.detach()
    try:  # converted on the CPU (as `convert` runs): the timing moves it to the spec's device
        full = copy.deepcopy(model).cpu().eval()
        small = convert(full, graph, keep)
    finally:
        if attached:
            gates.attach(model, graph)
        model.train(was)
    res = compare_latency(full, small, spec, flops_ratio=float("nan"), rounds=rounds)
    return res.latency_ratio, res.ratio_range


def correction(predicted: float, measured: float) -> float:
    """Factor on the predicted ceiling that makes the measured ratio meet the target.

    GatorError beyond :data:`MAX_CORRECTION`: the table does not describe this device.
    """
    if not measured > 0:
        raise GatorError(f"calibration measured a latency ratio of {measured}; time it again")
    scale = predicted / measured
    if not 1 / MAX_CORRECTION <= scale <= MAX_CORRECTION:
        raise GatorError(
            f"the kept network measures {measured:.3f} of the full net's latency but the cost "
            f"model predicts {predicted:.3f}: the latency table does not describe this device "
            "(or it was busy); profile it again here, or pass --calibrate off"
        )
    return scale


#: Paired rounds of each measurement of the kept network.
CALIBRATION_ROUNDS = 5

#: Measurements pool with weight ``exp(-|log(predicted_i / predicted_now)| / POOL_SCALE)``.
POOL_SCALE = 0.05


class Calibrator:
    """The measurements of one run: when they happen, how they are taken (rank 0 times,
    every rank gets the figure) and the correction they pool to.

    Parameters
    ----------
    spec, note : from :func:`calibration_spec` (``spec`` None: measurements are off, ``note``
        says why).
    mode : ``--calibrate`` (``on`` turns a refused measurement into an error).
    schedule : the budget's schedule (measured at ``reach_step`` and half-way to
        ``freeze_step``), or None.
    """

    def __init__(self, spec: TimingSpec | None, note: str, mode: str,
                 schedule=None, *, main: bool = True, distributed: bool = False) -> None:
        self.spec, self.note, self.mode = spec, note, mode
        self.main, self.distributed = main, distributed
        self.points: list[CalibrationPoint] = []
        self.steps: set[int] = set()
        if spec is not None and schedule is not None and schedule.freeze_step > schedule.reach_step:
            r, f = schedule.reach_step, schedule.freeze_step
            self.steps = {r, r + (f - r) // 2}

    @property
    def on(self) -> bool:
        return self.spec is not None

    def due(self, step: int) -> bool:
        return step in self.steps

    def measure(self, model: nn.Module, graph: HyperGraph, gates: GateSet,
                device: torch.device) -> tuple[float, tuple[float, float]]:
        """Measured latency ratio of the kept network and its range (collective under DDP)."""
        vals = torch.zeros(3, dtype=torch.float64, device=device)
        if self.main:
            m, (lo, hi) = measure_kept(model, graph, gates, self.spec, rounds=CALIBRATION_ROUNDS)
            vals = torch.tensor([m, lo, hi], dtype=torch.float64, device=device)
        if self.distributed:
            torch.distributed.broadcast(vals, 0)
        m, lo, hi = vals.tolist()
        return m, (lo, hi)

    def record(self, step: int, predicted: float, measured: float,
               spread: tuple[float, float], current_scale: float) -> tuple[CalibrationPoint, str]:
        """Add a measurement; return it (``accepted`` False when refused) and why if refused.

        The correction pools the accepted measurements so far (a weighted geometric mean of
        predicted / measured): one measurement on a busy host is a few per cent off, and
        following it alone would move the ceiling by its noise; measurements of nets whose
        predicted cost is far from this one's count for little (:data:`POOL_SCALE`).
        """
        try:
            correction(predicted, measured)  # refuses a measurement far off the model
        except GatorError as exc:
            if self.mode == "on":
                raise
            point = CalibrationPoint(step, predicted, measured, spread, current_scale, False)
            self.points.append(point)
            return point, str(exc)
        pts = [(c.predicted, c.measured) for c in self.points if c.accepted]
        pts.append((predicted, measured))
        # weighted by how close each measured net was to this one: the model's error depends
        # on the structure, so one taken on a much narrower net says little about this one
        w = [math.exp(-abs(math.log(p / predicted)) / POOL_SCALE) for p, _ in pts]
        scale = math.exp(sum(wi * math.log(p / m) for wi, (p, m) in zip(w, pts, strict=True))
                         / sum(w))
        point = CalibrationPoint(step, predicted, measured, spread, scale)
        self.points.append(point)
        return point, ""

    def state(self) -> list[dict]:
        return [c.to_dict() for c in self.points]

    def load(self, state: list[dict]) -> None:
        self.points = [CalibrationPoint(**{**c, "spread": tuple(c["spread"])}) for c in state]
