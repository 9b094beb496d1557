"""What one latency number is measured under: the timing spec, and the device it names.

A :class:`TimingSpec` fixes everything a number depends on (model, batch, input size, dtype,
layout, device, regime, threads, warm-up, blocks); :func:`make_spec` builds one from user
options with each device's defaults. How it is measured lives in
:mod:`gator_hw.profile.timing`; what the device is, in :mod:`gator_hw.profile.device`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from gator_hw.errors import GatorError
from gator_hw.profile.backends import BACKENDS, check_backend, require_backend
from gator_hw.profile.device import _device_name

__all__ = ["BACKENDS", "DTYPES", "REGIMES", "TimingOptions", "TimingSpec", "make_spec",
           "resolve_device"]

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
    interleave : time each network in blocks alternating with a reference network's (ABBA;
        the CPU default, opt-in on CUDA).
    backend : the runtime that runs the forwards: ``torch``, ``onnxruntime`` or ``tensorrt``
        (:mod:`gator_hw.profile.backends`).
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
    backend: str = "torch"
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
        check_backend(self)

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
        runtime = f" in {self.backend}" if self.backend != "torch" else ""
        return (
            f"{self.model} [{self.variant}] b{self.batch} {self.input_size}px "
            f"{self.dtype}{layout}{runtime} on {self.device} ({self.device_name}, {self.regime}"
            f"{paired}, {self.threads} threads)"
        )



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
    backend: str = "torch",
) -> TimingSpec:
    """Build a :class:`TimingSpec` from user options, resolving the device and its defaults.

    CPU defaults: 3 warm-up calls, 10 blocks of >= 50 ms, interleaved with a reference.
    CUDA defaults: 5 warm-up forwards, 10 blocks of >= 5 ms, graph replay unless ``eager``.
    ``backend="onnxruntime"`` times float32 CPU forwards in ONNX Runtime, ``"tensorrt"`` CUDA
    forwards in TensorRT engines (:mod:`gator_hw.profile.backends`).
    """
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    require_backend(backend)
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
        backend=backend,
    )


@dataclass(frozen=True)
class TimingOptions:
    """The user's timing options, as the CLI takes them (``None``: the device's default).

    One object carries them from a command through :class:`~gator_hw.profile.runner.
    ProfileRequest` or ``bench`` to :meth:`spec`, which resolves the device and its defaults
    (:func:`make_spec`).
    """

    device: str = "cpu"
    batch: int = 1
    input_size: int | None = None
    dtype: str = "float32"
    channels_last: bool = False
    eager: bool = False
    threads: int | None = None
    warmup: int | None = None
    repeats: int | None = None
    min_block_s: float | None = None
    interleave: bool | None = None
    backend: str = "torch"

    def spec(self, model: str, input_size: int | None = None) -> TimingSpec:
        """The timing spec of ``model`` (``input_size`` when the options leave it open)."""
        opts = dataclasses.asdict(self)
        size = opts.pop("input_size") or input_size
        if size is None:
            raise GatorError("an input size is needed to time a network; pass --input-size")
        return make_spec(model, input_size=size, **opts)
