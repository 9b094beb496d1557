"""Cost models that turn timing tables into per-hyperedge cost multipliers.

:mod:`gator_hw.costmodel.gator` is the original GATOR recipe (one probe per edge at half
width), kept as the baseline and for reading the published timing tables.
"""

from __future__ import annotations

from gator_hw.costmodel.gator import (
    GATOR_COLUMNS,
    OUTLIER_K,
    gator_config_from_table,
    gator_multipliers,
    outlier_filter,
    read_gator_csv,
    write_gator_csv,
)

__all__ = [
    "GATOR_COLUMNS",
    "OUTLIER_K",
    "gator_config_from_table",
    "gator_multipliers",
    "outlier_filter",
    "read_gator_csv",
    "write_gator_csv",
]
