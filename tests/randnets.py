"""Small, configurable, fx-traceable CNNs for property tests: every channel pattern at once.

One ``NetSpec`` draws a net with a stem edge, an optional residual block (inner edge joined to
the stem by an add), an optional grouped conv and depthwise conv on the stem's channels, two
branches concatenated along channels, an optional conv reading the concatenation, and a head
that either pools to 1x1 or flattens a 2x2 map into the classifier (each channel then covers
four features: the ``repeat`` of a layout segment).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from gator_hw.graph import HyperGraph
from gator_hw.soundness import random_plan

INPUT = (1, 3, 8, 8)


@dataclass(frozen=True)
class NetSpec:
    """The shape of one random net (widths, which optional parts it has, its head)."""

    stem_per_group: int = 2
    groups: int = 1
    inner: int = 3
    branch_a: int = 2
    branch_b: int = 3
    residual: bool = True
    grouped: bool = False
    depthwise: bool = False
    cat_conv: int = 0
    flatten_head: bool = True
    bias: bool = False
    classes: int = 3

    @property
    def stem(self) -> int:
        return self.stem_per_group * self.groups


class RandNet(nn.Module):
    """The net a ``NetSpec`` describes (batch norms everywhere a conv writes an edge)."""

    def __init__(self, s: NetSpec) -> None:
        super().__init__()
        self.s = s
        c = s.stem
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=s.bias)
        self.bn0 = nn.BatchNorm2d(c)
        if s.residual:
            self.c1 = nn.Conv2d(c, s.inner, 3, padding=1, bias=s.bias)
            self.bn1 = nn.BatchNorm2d(s.inner)
            self.c2 = nn.Conv2d(s.inner, c, 1, bias=s.bias)
            self.bn2 = nn.BatchNorm2d(c)
        if s.grouped:
            self.gconv = nn.Conv2d(c, c, 3, padding=1, groups=s.groups, bias=s.bias)
        if s.depthwise:
            self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=s.bias)
        self.ca = nn.Conv2d(c, s.branch_a, 1, stride=2, bias=s.bias)
        self.cb = nn.Conv2d(c, s.branch_b, 3, stride=2, padding=1, bias=s.bias)
        width = s.branch_a + s.branch_b
        if s.cat_conv:
            self.cc = nn.Conv2d(width, s.cat_conv, 1, bias=s.bias)
            width = s.cat_conv
        self.pool = nn.AdaptiveAvgPool2d(2 if s.flatten_head else 1)
        self.fc = nn.Linear(width * (4 if s.flatten_head else 1), s.classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        x = torch.relu(self.bn0(self.stem(x)))
        if s.residual:
            x = x + self.bn2(self.c2(torch.relu(self.bn1(self.c1(x)))))
        if s.grouped:
            x = torch.relu(self.gconv(x))
        if s.depthwise:
            x = self.dw(x)
        y = torch.cat([torch.relu(self.ca(x)), torch.relu(self.cb(x))], 1)
        if s.cat_conv:
            y = torch.relu(self.cc(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights and batch-norm statistics, so every removed channel shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build(s: NetSpec, seed: int = 0) -> RandNet:
    """A float64, eval-mode ``RandNet`` with random weights."""
    return randomize(RandNet(s).double(), seed).eval()


def draw_plan(graph: HyperGraph, rng: random.Random) -> dict[int, list[int]]:
    """Kept channels for every edge: 1..C of them, the same count in every conv group."""
    return random_plan(graph, rng)


def inputs(seed: int = 1, batch: int = 2) -> torch.Tensor:
    """A float64 batch of the nets' input shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *INPUT[1:]), generator=g, dtype=torch.float64)
