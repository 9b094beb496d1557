"""The timing engines: how one latency number is measured under a :class:`TimingSpec`.

The spec itself is :mod:`gator_hw.profile.spec`, the device description
:mod:`gator_hw.profile.device` (both re-exported here). The CUDA engine is :func:`_time_cuda`.

One measurement times the whole forward of one (possibly slimmed) network at a fixed batch,
dtype and memory layout, in eval mode under ``torch.inference_mode()``:

* **CPU** (regime ``cpu``): ``torch.utils.benchmark.Timer`` with an explicit thread count.
  ``warmup`` plain calls estimate the per-call time (their minimum, robust to a stall); the
  timed statement runs enough forwards to last ``min_block_s`` (so timer overhead, ~2 us, is
  below 1e-4 and the Timer keeps one statement per block), and ``blocked_autorange`` runs
  ``repeats`` such blocks, topped up if the Timer chose longer ones. The IQR is thus always
  taken over ``repeats`` or more values.
* **CPU, interleaved** (``interleave``, the CPU default for the profiler): blocks of the timed
  network alternate with blocks of a reference network (the full-width net), in ABBA order,
  each block ``perf_counter`` around whole forwards at the spec's thread count. The reference's
  blocks are the cell's own baseline: a shared or frequency-scaling CPU that switches between a
  fast and a slow state every few seconds moves both alike, so their ratio stays put.
* **CUDA, graph replay** (regime ``cuda-graph``, the default): ``warmup`` forwards on a side
  stream (this is also where ``cudnn.benchmark`` autotunes each new shape), capture of one
  forward with ``torch.cuda.graph``, then ``repeats`` blocks of back-to-back replays, each
  block bracketed by CUDA events and synchronised once at the end. Launch overhead is gone,
  so the numbers are the GPU's own time for the kernels.
* **CUDA, interleaved** (``--interleave`` on CUDA, opt-in until measured on a GPU): both
  graphs (or eager callers) are prepared first, then the blocks of the model and of the
  reference alternate in ABBA order, all recorded with events and synchronised once: clock
  drift over a cell moves both alike, as on the CPU.
* **CUDA, eager** (regime ``cuda-eager``): the same, with plain ``model(x)`` calls. For small
  or narrow networks this is launch-bound: the CPU cannot issue kernels as fast as the GPU
  runs them, and narrowing a layer saves nothing.

Every per-call time is one block's time divided by the calls in the block. The result keeps
those raw values (and the reference's, when interleaved); median, IQR and relative IQR are
derived from them. A result's ``noise`` is the relative IQR of its per-block ratios to the
reference when interleaved, else of its times; above :data:`NOISY_REL_IQR` it warns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.profile.backends import reference_net, runtime_net
from gator_hw.profile.device import cpu_name, device_info, device_slug
from gator_hw.profile.spec import DTYPES, REGIMES, TimingSpec, make_spec, resolve_device

T = TypeVar("T")

#: What the CPU engines time: a module, or any callable of the input (an ONNX Runtime session).
Forward = nn.Module | Callable[[torch.Tensor], object]

__all__ = [
    "DTYPES",
    "NOISY_REL_IQR",
    "REGIMES",
    "VERY_NOISY_REL_IQR",
    "LatencyResult",
    "TimingSpec",
    "cpu_name",
    "device_info",
    "device_slug",
    "make_spec",
    "resolve_device",
    "time_model",
    "torch_settings",
]

#: A cell whose IQR / median exceeds this is flagged noisy (and re-measured once by the runner).
NOISY_REL_IQR: float = 0.10
#: Above this relative IQR the number is hardly usable; the warning says so.
VERY_NOISY_REL_IQR: float = 0.25



def _quantiles(times: tuple[float, ...]) -> tuple[float, float, float]:
    q1, med, q3 = np.quantile(np.asarray(times, dtype=float), [0.25, 0.5, 0.75])
    return float(q1), float(med), float(q3)


@dataclass(frozen=True)
class LatencyResult:
    """Raw per-call times of one measurement (seconds, one per timed block) and their stats.

    ``times_s[i]`` is block ``i``'s time divided by ``number`` (calls per block);
    ``ref_times_s[i]`` the interleaved reference block next to it (empty if not interleaved).
    Statistics are properties, so they always agree with the raw data.
    """

    spec: TimingSpec
    times_s: tuple[float, ...]
    number: int = 1
    ref_times_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.times_s:
            raise ValueError("a LatencyResult needs at least one timed block")
        if self.ref_times_s and len(self.ref_times_s) != len(self.times_s):
            raise ValueError("interleaved reference blocks must pair one to one with the timed")

    @property
    def median_ms(self) -> float:
        return 1e3 * _quantiles(self.times_s)[1]

    @property
    def mean_ms(self) -> float:
        return 1e3 * float(np.mean(self.times_s))

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = _quantiles(self.times_s)
        return 1e3 * (q3 - q1)

    @property
    def rel_iqr(self) -> float:
        """IQR / median (dimensionless); the noise of this one measurement."""
        med = self.median_ms
        return self.iqr_ms / med if med > 0 else math.inf

    @property
    def ref_median_ms(self) -> float | None:
        """Median of the interleaved reference's blocks (``None`` if not interleaved)."""
        return 1e3 * _quantiles(self.ref_times_s)[1] if self.ref_times_s else None

    @property
    def noise(self) -> float:
        """Relative IQR of the per-block ratios to the reference if interleaved, else rel_iqr."""
        if not self.ref_times_s:
            return self.rel_iqr
        q1, med, q3 = _quantiles(
            tuple(t / r for t, r in zip(self.times_s, self.ref_times_s, strict=True))
        )
        return (q3 - q1) / med if med > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.noise > NOISY_REL_IQR

    @property
    def noise_text(self) -> str:
        """The noise in words: ``IQR 3.1 % of the median`` (or of the ratios, interleaved)."""
        what = "of the ratios to the reference" if self.ref_times_s else "of the median"
        return f"IQR {100 * self.noise:.1f} % {what}"

    @property
    def warnings(self) -> tuple[str, ...]:
        """Noise warnings, derived from the data against the module thresholds."""
        out = []
        if self.noise > VERY_NOISY_REL_IQR:
            out.append(
                f"very noisy: {self.noise_text} "
                f"(> {100 * VERY_NOISY_REL_IQR:.0f} %); the machine is busy or throttling"
            )
        elif self.noise > NOISY_REL_IQR:
            out.append(f"noisy: {self.noise_text} (> {100 * NOISY_REL_IQR:.0f} %)")
        if len(self.times_s) < 4:
            out.append(f"only {len(self.times_s)} timed blocks; the IQR is unreliable")
        return tuple(out)

    @property
    def has_warnings(self) -> bool:
        return bool(self.warnings)

    def __str__(self) -> str:
        text = (
            f"{self.spec}: median {self.median_ms:.4g} ms, IQR {self.iqr_ms:.3g} ms "
            f"({100 * self.rel_iqr:.2f} %), {len(self.times_s)} blocks x {self.number}"
        )
        if self.ref_times_s:
            text += f"; reference {self.ref_median_ms:.4g} ms, ratio noise {100 * self.noise:.2f} %"
        return text + "".join(f"\n  WARNING: {w}" for w in self.warnings)


# ---------------------------------------------------------------------------
# global torch state
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def torch_settings(
    *,
    threads: int | None = None,
    cudnn_benchmark: bool | None = None,
    grad_enabled: bool | None = None,
    model: nn.Module | None = None,
    tf32: bool | None = None,
) -> Iterator[None]:
    """Set torch's thread count, ``cudnn.benchmark``, grad mode, TF32 (convs and matmuls
    alike) and ``model``'s eval mode.

    Arguments left at ``None`` are not touched. ``model`` is put in eval mode. Every previous
    value (each submodule's train flag included) is restored in ``finally``.
    """
    old_threads = torch.get_num_threads()
    old_tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    old_bench = torch.backends.cudnn.benchmark
    old_grad = torch.is_grad_enabled()
    old_modes = [(m, m.training) for m in model.modules()] if model is not None else []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        if grad_enabled is not None:
            torch.set_grad_enabled(grad_enabled)
        if tf32 is not None:  # a "float32" CUDA table is timed as its spec says, not as set
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
        if model is not None:
            model.eval()
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.set_grad_enabled(old_grad)
        for m, mode in old_modes:
            m.training = mode


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------
def _time_cpu(model: Forward, x: torch.Tensor, spec: TimingSpec) -> tuple[list[float], int]:
    # importing the benchmark utilities probes for a CUDA toolkit and warns on CPU-only hosts
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    per_call = _warm_per_call(model, x, spec.warmup)
    calls = max(1, math.ceil(spec.min_block_s / per_call))  # forwards per timed statement
    timer = Timer(
        stmt="for _ in calls:\n    model(x)",
        globals={"model": model, "x": x, "calls": range(calls)},
        num_threads=spec.threads,
        label=spec.model,
        sub_label=spec.variant,
    )
    block_s = calls * per_call
    m = timer.blocked_autorange(min_run_time=spec.repeats * block_s)
    times = [t / calls for t in m.times]
    number = calls * m.number_per_run
    while len(times) < spec.repeats:  # the Timer chose longer blocks: top up the count
        block_s = number * float(np.median(times))
        more = timer.blocked_autorange(min_run_time=(spec.repeats - len(times)) * block_s)
        times += [t / calls for t in more.times]
    return times, int(number)


def _warm_per_call(model: Forward, x: torch.Tensor, warmup: int) -> float:
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        model(x)
        warm.append(time.perf_counter() - t0)
    return min(warm)  # robust to a stall (first call, a busy neighbour)


def _block(model: Forward, x: torch.Tensor, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        model(x)
    return (time.perf_counter() - t0) / calls


def abba(block_a: Callable[[], T], block_b: Callable[[], T], repeats: int
         ) -> tuple[list[T], list[T]]:
    """``repeats`` blocks of each in ABBA order (B A, A B, B A, ...): drift over the run hits
    both alike. Returns the blocks' results, A's then B's."""
    a: list[T] = []
    b: list[T] = []
    for i in range(repeats):
        if i % 2 == 0:
            b.append(block_b())
            a.append(block_a())
        else:
            a.append(block_a())
            b.append(block_b())
    return a, b


def _time_cpu_interleaved(
    model: Forward, reference: Forward, x: torch.Tensor, spec: TimingSpec
) -> tuple[list[float], list[float], int]:
    """``repeats`` blocks of each network in ABBA order; per-call times of model and reference."""
    calls = [
        max(1, math.ceil(spec.min_block_s / _warm_per_call(m, x, spec.warmup)))
        for m in (model, reference)
    ]
    times, ref = abba(lambda: _block(model, x, calls[0]), lambda: _block(reference, x, calls[1]),
                      spec.repeats)
    return times, ref, calls[0]


#: Seconds of replays after capture, before timing: the GPU idled during the cell's CPU work
#: (slimming, copying, capture) and its clocks must ramp back up.
CUDA_WARM_S = 0.25


def cuda_error(exc: BaseException, spec: TimingSpec, *, graph: bool) -> GatorError | None:
    """The one-line error for a CUDA failure while timing (out of memory, a failed graph
    capture), naming the fix; ``None`` for anything else (a bug: let it propagate)."""
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return GatorError(
            f"out of GPU memory timing {spec.model} at batch {spec.batch} ({spec.input_size} "
            f"px, {spec.dtype}); use a smaller --batch-size"
        )
    if graph and isinstance(exc, RuntimeError) and any(
            w in first.lower() for w in ("captur", "graph", "not permitted")):
        return GatorError(
            f"CUDA-graph capture of {spec.model} failed ({first}): its forward synchronises "
            "with the host or changes shape between calls; time it with --eager"
        )
    return None


def _time_cuda(
    model: nn.Module, x: torch.Tensor, spec: TimingSpec, *, graph: bool,
    reference: nn.Module | None = None,
) -> tuple[list[float], list[float], int]:
    try:
        return _time_cuda_unchecked(model, x, spec, graph=graph, reference=reference)
    except RuntimeError as exc:  # OutOfMemoryError is one too
        mapped = cuda_error(exc, spec, graph=graph)
        if mapped is None:
            raise
        raise mapped from None


def _warm_for(call: Callable[[], object], seconds: float) -> None:
    """Run ``call`` in growing batches until ``seconds`` of wall time have passed."""
    end, n = time.perf_counter() + seconds, 1
    while time.perf_counter() < end:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
        n = min(2 * n, 1024)


def _cuda_caller(model: nn.Module, x: torch.Tensor, spec: TimingSpec, graph: bool
                 ) -> tuple[Callable[[], object], object]:
    """Warm ``model`` up on a side stream (cudnn autotunes there) and return one forward as a
    call: a CUDA-graph replay, or ``model(x)`` eager; plus the graph to keep alive."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(spec.warmup):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if not graph:
        return (lambda: model(x)), None
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        model(x)
    return cuda_graph.replay, cuda_graph


def _events(call: Callable[[], object], n: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """``n`` calls bracketed by CUDA events (recorded, not waited for)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        call()
    end.record()
    return start, end


def _calls_per_block(call: Callable[[], object], spec: TimingSpec) -> int:
    call()  # the first replay / call after capture is not timed
    _warm_for(call, CUDA_WARM_S)
    start, end = _events(call, 3)
    end.synchronize()
    per_call_s = start.elapsed_time(end) / 3 / 1e3
    return max(1, math.ceil(spec.min_block_s / max(per_call_s, 1e-9)))


def _time_cuda_unchecked(
    model: nn.Module, x: torch.Tensor, spec: TimingSpec, *, graph: bool,
    reference: nn.Module | None = None,
) -> tuple[list[float], list[float], int]:
    """Per-call times of ``repeats`` blocks, one sync at the end; with ``reference``, its
    blocks alternate with the model's in ABBA order (both graphs captured first)."""
    with torch.cuda.device(spec.torch_device):
        call, keep = _cuda_caller(model, x, spec, graph)
        ref_call, ref_keep = (_cuda_caller(reference, x, spec, graph) if reference is not None
                              else (None, None))
        number = _calls_per_block(call, spec)
        if ref_call is None:
            events, ref_events = [_events(call, number) for _ in range(spec.repeats)], []
            ref_number = 1
        else:
            ref_number = _calls_per_block(ref_call, spec)
            _warm_for(call, CUDA_WARM_S)  # the model idled while the reference was measured
            events, ref_events = abba(lambda: _events(call, number),
                                      lambda: _events(ref_call, ref_number), spec.repeats)
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 / number for s, e in events]
        ref = [s.elapsed_time(e) / 1e3 / ref_number for s, e in ref_events]
        del keep, ref_keep
    return times, ref, number


def _prepare(model: nn.Module, spec: TimingSpec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    model = model.to(
        device=spec.torch_device, dtype=spec.torch_dtype, memory_format=spec.memory_format
    )
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.input_shape, generator=gen)
    x = x.to(device=spec.torch_device, dtype=spec.torch_dtype)
    return model, x.contiguous(memory_format=spec.memory_format)


def time_model(
    model: nn.Module, spec: TimingSpec, *, seed: int = 0, reference: nn.Module | None = None
) -> LatencyResult:
    """Time whole forwards of ``model`` under ``spec``'s protocol (see the module docstring).

    ``model`` (and ``reference``) are moved to the spec's device, dtype and memory format in
    place and their parameters stop requiring grad; pass copies you own (``slim`` returns one).
    They run in eval mode under ``torch.inference_mode()``, with ``spec.threads`` threads and
    ``cudnn.benchmark = spec.cudnn_benchmark``; all of that is restored afterwards. With a
    ``reference`` and ``spec.interleave``, blocks of the two alternate and the result carries
    the reference's times too.

    Returns
    -------
    LatencyResult
        ``spec`` with ``repeats`` or more per-call times in seconds.
    """
    model, x = _prepare(model, spec, seed)
    paired = reference is not None and spec.interleave
    if paired:
        reference, _ = _prepare(reference, spec, seed)
    ref: list[float] = []
    with (
        torch_settings(
            threads=spec.threads,
            cudnn_benchmark=spec.cudnn_benchmark,
            grad_enabled=False,
            model=model,
            tf32=spec.tf32 if spec.torch_device.type == "cuda" else None,
        ),
        torch_settings(model=reference if paired else None),
        torch.inference_mode(),
    ):
        if spec.backend != "torch":  # the same protocol around the runtime's calls
            model = runtime_net(model, x, spec)
            reference = reference_net(reference, x, spec) if paired else reference
        if paired and spec.regime == "cpu":
            times, ref, number = _time_cpu_interleaved(model, reference, x, spec)
        elif spec.regime == "cpu":
            times, number = _time_cpu(model, x, spec)
        else:
            times, ref, number = _time_cuda(model, x, spec, graph=spec.regime == "cuda-graph",
                                            reference=reference if paired else None)
    return LatencyResult(
        spec, tuple(float(t) for t in times), number, tuple(float(t) for t in ref)
    )
