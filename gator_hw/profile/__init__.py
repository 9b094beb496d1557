"""The profiler: latency tables of slimmed networks on a target device.

``ProfileRequest.create(...)`` validates options into a :class:`TimingSpec` plus the variant
settings; :func:`run` times every variant in interleaved rounds and writes the tidy CSV, the
GATOR-compatible CSV and a JSON sidecar (see ``timing``, ``variants``, ``runner``, ``tables``).
"""

from gator_hw.profile.runner import ProfileRequest, ProfileResult, default_out, run
from gator_hw.profile.tables import Cell, gator_frame, read_table, summarize
from gator_hw.profile.timing import (
    NOISY_REL_IQR,
    LatencyResult,
    TimingSpec,
    make_spec,
    time_model,
    torch_settings,
)
from gator_hw.profile.variants import Variant, build_variants, parse_widths

__all__ = [
    "NOISY_REL_IQR",
    "Cell",
    "LatencyResult",
    "ProfileRequest",
    "ProfileResult",
    "TimingSpec",
    "Variant",
    "build_variants",
    "default_out",
    "gator_frame",
    "make_spec",
    "parse_widths",
    "read_table",
    "run",
    "summarize",
    "time_model",
    "torch_settings",
]
