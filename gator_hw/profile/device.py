"""The device a number was measured on: its name, folder slug and full description."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from typing import TYPE_CHECKING

import torch

from gator_hw.profile.backends import runtime_slug

if TYPE_CHECKING:
    from gator_hw.profile.spec import TimingSpec

__all__ = ["cpu_name", "device_info", "device_slug", "gpu_state"]


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


#: GPU form factors that change clocks and power limits (H100 SXM vs PCIe vs NVL).
_FORM_FACTORS = ("pcie", "sxm", "sxm2", "sxm3", "sxm4", "sxm5", "nvl")


def device_slug(spec: TimingSpec) -> str:
    """Short folder name for a device: ``h200``, ``h100-pcie``, ``a100-sxm4``, ``rtx-4090``,
    a MIG slice as ``h100-mig-1g10gb`` (a slice is not the whole GPU), and for CPUs ``cpu-``
    and their family (``cpu-amd-epyc``, ``cpu-intel-xeon``): tables of two devices that time
    differently never share a folder. Tables timed in ONNX Runtime get ``-ort``
    (``cpu-amd-epyc-ort``)."""
    name = spec.device_name.lower().replace("(r)", " ").replace("(tm)", " ")
    words = [w for w in name.replace("-", " ").split() if w not in _NOISE_WORDS]
    picked: list[str] = []
    rest: list[str] = []
    for i, w in enumerate(words):
        if "@" in w or w.endswith("ghz"):
            break
        picked.append("".join(c for c in w if c.isalnum()))
        if any(c.isdigit() for c in w):
            rest = words[i + 1:]
            break
    slug = "-".join(p for p in picked if p)
    runtime = runtime_slug(spec)
    if not spec.device.startswith("cuda"):
        return (f"cpu-{slug}" if slug else "cpu") + runtime
    form = next((w for w in rest if w in _FORM_FACTORS), None)
    slug += f"-{form}" if form else ""
    if "mig" in rest:
        after = rest[rest.index("mig") + 1:]
        slug += "-mig" + (f"-{''.join(c for c in after[0] if c.isalnum())}" if after else "")
    return (slug or "cuda") + runtime


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


def gpu_state(device: object) -> dict[str, float]:
    """SM clock (MHz), power draw (W) and temperature (C) of a CUDA device read through NVML
    (``torch.cuda.clock_rate`` and friends); empty where NVML is not available."""
    import torch

    out: dict[str, float] = {}
    for key, fn, scale in (("sm_clock_mhz", "clock_rate", 1.0), ("power_w", "power_draw", 1e-3),
                           ("temperature_c", "temperature", 1.0)):
        try:
            out[key] = float(getattr(torch.cuda, fn)(device)) * scale
        except Exception:  # no pynvml / NVML, or a MIG slice that hides it: nothing to record
            return {}
    return out
