"""The timing protocol: what one latency number means, and how it is measured.

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
import dataclasses
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gator_hw.errors import GatorError

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

#: dtype names accepted on the command line, with their torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: How a number was measured: plain CPU calls, CUDA-graph replay, or eager CUDA calls.
REGIMES: tuple[str, ...] = ("cpu", "cuda-graph", "cuda-eager")


@dataclass(frozen=True)
class TimingSpec:
    """Everything a latency number depends on (frozen and hashable, like a benchmark TaskSpec).

    Parameters
    ----------
    model : model name as given to ``load_network`` (torchvision name or ``file.py:factory``).
    batch : samples per forward.
    input_size : square input side in pixels.
    dtype : ``float32``, ``float16`` or ``bfloat16`` (weights and input).
    channels_last : whether weights and input use the NHWC memory format.
    device : ``cpu`` or ``cuda:N``.
    device_name : what the device is (GPU product name, CPU model name).
    regime : one of :data:`REGIMES`.
    threads : intra-op CPU threads (on CUDA: the host threads, which matter little).
    warmup : untimed forwards before timing (per measurement; also cudnn autotuning).
    repeats : timed blocks, at least; the IQR is taken over the per-block per-call times.
    min_block_s : shortest block in seconds; short calls are repeated within a block.
    cudnn_benchmark : ``torch.backends.cudnn.benchmark`` while timing.
    tf32 : whether float32 convs may use TF32 tensor cores (``cudnn.allow_tf32``).
    interleave : time each network in blocks alternating with a reference network's (CPU).
    torch_version : ``torch.__version__``.
    variant : id of the timed network variant (``full`` for the unpruned net).
    """

    model: str
    batch: int
    input_size: int
    dtype: str = "float32"
    channels_last: bool = False
    device: str = "cpu"
    device_name: str = "cpu"
    regime: str = "cpu"
    threads: int = 1
    warmup: int = 3
    repeats: int = 10
    min_block_s: float = 0.05
    cudnn_benchmark: bool = True
    tf32: bool = False
    interleave: bool = False
    torch_version: str = torch.__version__
    variant: str = "full"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise GatorError(f"unknown dtype '{self.dtype}'; use one of {', '.join(DTYPES)}")
        if self.regime not in REGIMES:
            raise GatorError(f"unknown timing regime '{self.regime}'; use {', '.join(REGIMES)}")
        for name in ("batch", "input_size", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise GatorError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 1:
            raise GatorError(f"warmup must be >= 1 forward, got {self.warmup}")
        if self.interleave and self.regime != "cpu":
            raise GatorError(
                "--interleave is for CPU timing; on CUDA, graph replay is stable without it "
                "(use --no-interleave or leave it out)"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, self.input_size, self.input_size)

    def for_variant(self, variant: str) -> TimingSpec:
        """The same protocol for another network variant."""
        return dataclasses.replace(self, variant=variant)

    def key(self) -> dict:
        """The protocol as plain data, without the variant (what resumed cells must share)."""
        out = dataclasses.asdict(self)
        out.pop("variant")
        return out

    def __str__(self) -> str:
        layout = " channels-last" if self.channels_last else ""
        paired = ", interleaved" if self.interleave else ""
        return (
            f"{self.model} [{self.variant}] b{self.batch} {self.input_size}px "
            f"{self.dtype}{layout} on {self.device} ({self.device_name}, {self.regime}"
            f"{paired}, {self.threads} threads)"
        )


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
) -> Iterator[None]:
    """Set torch's thread count, ``cudnn.benchmark``, grad mode and ``model``'s eval mode.

    Arguments left at ``None`` are not touched. ``model`` is put in eval mode. Every previous
    value (each submodule's train flag included) is restored in ``finally``.
    """
    old_threads = torch.get_num_threads()
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
        if model is not None:
            model.eval()
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench
        torch.set_grad_enabled(old_grad)
        for m, mode in old_modes:
            m.training = mode


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------
def resolve_device(text: str) -> torch.device:
    """Parse ``cpu``, ``cuda`` or ``cuda:N`` and check that the device exists here.

    Raises
    ------
    GatorError
        For any other name, for CUDA without a usable GPU, or an index out of range.
    """
    name = text.strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise GatorError(
                f"--device {text} needs a CUDA GPU, but torch {torch.__version__} sees none on "
                "this machine; use --device cpu or run on a machine with a GPU"
            )
        index = int(name[5:]) if ":" in name else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise GatorError(
                f"--device {text}: this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1}); pick one of those"
            )
        return torch.device("cuda", index)
    raise GatorError(f"unknown device '{text}'; use cpu, cuda or cuda:N")


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else ``platform``)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


#: Words a device name carries that do not tell two devices apart.
_NOISE_WORDS = ("nvidia", "geforce", "tesla", "quadro", "(r)", "(tm)", "cpu", "processor")


def device_slug(spec: TimingSpec) -> str:
    """Short folder name for a device: ``h100``, ``a100``, ``rtx-4090``, and for CPUs ``cpu-``
    and their family (``cpu-amd-epyc``, ``cpu-intel-xeon``): tables of two CPUs never share
    a folder."""
    name = spec.device_name.lower().replace("(r)", " ").replace("(tm)", " ")
    words = [w for w in name.replace("-", " ").split() if w not in _NOISE_WORDS]
    picked: list[str] = []
    for w in words:
        if "@" in w or w.endswith("ghz"):
            break
        picked.append("".join(c for c in w if c.isalnum()))
        if any(c.isdigit() for c in w):
            break
    slug = "-".join(p for p in picked if p)
    if not spec.device.startswith("cuda"):
        return f"cpu-{slug}" if slug else "cpu"
    return slug or "cuda"


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def device_info(spec: TimingSpec) -> dict:
    """The software and hardware a measurement ran on (for the JSON sidecar)."""
    device = spec.torch_device
    info: dict = {
        "device": spec.device,
        "device_name": spec.device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "driver": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 2),
            multiprocessors=props.multi_processor_count,
        )
    else:
        info["mkldnn"] = torch.backends.mkldnn.is_available()
    return info


def make_spec(
    model: str,
    *,
    device: str = "cpu",
    batch: int = 1,
    input_size: int,
    dtype: str = "float32",
    channels_last: bool = False,
    eager: bool = False,
    threads: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    min_block_s: float | None = None,
    interleave: bool | None = None,
) -> TimingSpec:
    """Build a :class:`TimingSpec` from user options, resolving the device and its defaults.

    CPU defaults: 3 warm-up calls, 10 blocks of >= 50 ms, interleaved with a reference.
    CUDA defaults: 5 warm-up forwards, 10 blocks of >= 5 ms, graph replay unless ``eager``.
    """
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    if threads is not None and threads < 1:
        raise GatorError(f"--threads must be >= 1, got {threads}")
    return TimingSpec(
        model=model,
        batch=batch,
        input_size=input_size,
        dtype=dtype,
        channels_last=channels_last,
        device=str(dev),
        device_name=_device_name(dev),
        regime=("cuda-eager" if eager else "cuda-graph") if on_cuda else "cpu",
        threads=threads or torch.get_num_threads(),
        warmup=warmup or (5 if on_cuda else 3),
        repeats=repeats or 10,
        min_block_s=min_block_s or (0.005 if on_cuda else 0.05),
        cudnn_benchmark=True,
        tf32=bool(torch.backends.cudnn.allow_tf32) if on_cuda else False,
        interleave=(not on_cuda) if interleave is None else interleave,
    )


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------
def _time_cpu(model: nn.Module, x: torch.Tensor, spec: TimingSpec) -> tuple[list[float], int]:
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


def _warm_per_call(model: nn.Module, x: torch.Tensor, warmup: int) -> float:
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        model(x)
        warm.append(time.perf_counter() - t0)
    return min(warm)  # robust to a stall (first call, a busy neighbour)


def _block(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        model(x)
    return (time.perf_counter() - t0) / calls


def _time_cpu_interleaved(
    model: nn.Module, reference: nn.Module, x: torch.Tensor, spec: TimingSpec
) -> tuple[list[float], list[float], int]:
    """``repeats`` blocks of each network in ABBA order; per-call times of model and reference."""
    calls = [
        max(1, math.ceil(spec.min_block_s / _warm_per_call(m, x, spec.warmup)))
        for m in (model, reference)
    ]
    times: list[float] = []
    ref: list[float] = []
    for i in range(spec.repeats):
        if i % 2 == 0:
            ref.append(_block(reference, x, calls[1]))
            times.append(_block(model, x, calls[0]))
        else:
            times.append(_block(model, x, calls[0]))
            ref.append(_block(reference, x, calls[1]))
    return times, ref, calls[0]


def _time_cuda(
    model: nn.Module, x: torch.Tensor, spec: TimingSpec, *, graph: bool
) -> tuple[list[float], int]:
    device = spec.torch_device
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and cudnn autotune) off the default stream
            for _ in range(spec.warmup):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        cuda_graph: torch.cuda.CUDAGraph | None = None
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                model(x)
            call: Callable[[], object] = cuda_graph.replay
        else:

            def call() -> object:
                return model(x)

        def timed(n: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                call()
            end.record()
            return start, end

        call()  # first replay / call after capture is not timed
        start, end = timed(3)
        end.synchronize()
        per_call_s = start.elapsed_time(end) / 3 / 1e3
        number = max(1, math.ceil(spec.min_block_s / max(per_call_s, 1e-9)))
        events = [timed(number) for _ in range(spec.repeats)]  # back to back, one sync
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 / number for s, e in events]
        del cuda_graph
    return times, number


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
        ),
        torch_settings(model=reference if paired else None),
        torch.inference_mode(),
    ):
        if paired:
            times, ref, number = _time_cpu_interleaved(model, reference, x, spec)
        elif spec.regime == "cpu":
            times, number = _time_cpu(model, x, spec)
        else:
            times, number = _time_cuda(model, x, spec, graph=spec.regime == "cuda-graph")
    return LatencyResult(
        spec, tuple(float(t) for t in times), number, tuple(float(t) for t in ref)
    )
