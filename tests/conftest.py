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






def train_gates_then_convert(model: torch.nn.Module, graph, *, steps: int, batch: int,
                             classes: int = 5):
    """Train float64 gates attached to ``model`` for ``steps`` SGD steps on random data (every
    edge's logits must get a gradient), then give each channel a random logit around 0.5 (some
    close) and convert. Returns the detached gates and the converted model; ``model`` is left
    in eval mode, so ``gates.gated_output(model, graph, x)`` is what the conversion must equal."""
    from gator_hw.convert import convert
    from gator_hw.gates import GateSet

    model.train()
    gates = GateSet.from_graph(graph, init_prob=0.6).to(torch.float64)
    gates.attach(model, graph)
    opt = torch.optim.SGD([*model.parameters(), *gates.parameters()], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn((batch, *graph.input_shape[1:]), generator=gen, dtype=torch.float64)
        loss = torch.nn.functional.cross_entropy(
            model(x), torch.randint(0, classes, (batch,), generator=gen))
        opt.zero_grad()
        loss.backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in gates.logits)
        opt.step()
    gates.detach()
    with torch.no_grad():
        for t in gates.logits:  # close some channels of every edge, evenly per head
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) + 0.5)
    gates.update_masks()
    return gates, convert(model.eval(), graph, gates.kept_indices())
