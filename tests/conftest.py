"""Shared fixtures: reference files, small random models, random plans."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from gator_hw.network import Network, load_network
from gator_hw.soundness import random_plan, randomize_norms  # noqa: F401 (tests use them)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture
def one_thread():
    """Training tests: one intra-op thread (2 shared cores stall under OpenMP spin-waits)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def reference_dir() -> Path:
    """The original GATOR's published files (configs, timing and result tables)."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found under {REFERENCE} (shared/reference absent)")
    return REFERENCE


@cache
def cached_network(name: str, input_size: int | None = None) -> Network:
    """Build and trace a model once per test session (tests must not mutate it)."""
    return load_network(name, input_size=input_size)


def one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    """Assert a raised GatorError is one line naming every word in ``words``; return it."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg




