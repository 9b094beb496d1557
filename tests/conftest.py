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


def sample_input(shape: tuple[int, ...], seed: int = 0, n: int = 2) -> torch.Tensor:
    """``n`` seeded float64 samples of one input of ``shape`` (its batch dim replaced)."""
    return torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` relative to the largest ``|b|``."""
    return float((a - b).abs().max() / b.abs().max())


def check_random_plan(model: torch.nn.Module, graph, seed: int) -> None:
    """Slimmed to ``random_plan(graph, seed)``, ``model`` equals the masked model to 1e-12, the
    plan changes the output, and its FLOPs equal ``FlopCounterMode``'s (float64 models)."""
    from gator_hw.accounting import flop_counter_flops, network_cost
    from gator_hw.masking import masked_output
    from gator_hw.slim import slim

    plan = random_plan(graph, seed)  # uneven widths, evenly over each attention's heads
    x = sample_input(graph.input_shape, seed)
    ref = masked_output(model, graph, plan, x)
    small = slim(model, graph, plan)
    with torch.no_grad():
        out, full = small(x), model(x)
    assert rel_error(out, ref) <= 1e-12
    assert (full - ref).abs().max() > 1e-6  # the plan bites
    widths = {k: len(v) for k, v in plan.items()}
    assert network_cost(graph, widths).flops == flop_counter_flops(small, graph.input_shape)


def check_empty_plan(model: torch.nn.Module, graph) -> None:
    """The empty plan changes no tensor, and masking with it is the model itself."""
    from gator_hw.masking import masked_output
    from gator_hw.slim import slim

    after = slim(model, graph, {}).state_dict()
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    x = sample_input(graph.input_shape, 4)
    with torch.no_grad():
        assert rel_error(masked_output(model, graph, {}, x), model(x)) <= 1e-12


def converted_like_masked(model: torch.nn.Module, graph, plan, seed: int) -> torch.nn.Module:
    """``convert(model, graph, plan)``, checked against the masked model to 1e-12 on a seeded
    float64 input; returns the converted model."""
    from gator_hw.convert import convert
    from gator_hw.masking import masked_output

    small = convert(model, graph, plan)
    x = sample_input(graph.input_shape, seed)
    with torch.no_grad():
        assert rel_error(small(x), masked_output(model, graph, plan, x)) <= 1e-12
    return small


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
