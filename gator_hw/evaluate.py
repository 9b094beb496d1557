"""Accuracy of a model on a validation set, and side-by-side latency of two models."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gator_hw.profile.spec import TimingOptions
from gator_hw.profile.timing import TimingSpec, time_model

__all__ = ["Accuracy", "LatencyComparison", "accuracy", "bench_converted", "compare_latency"]


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy (%) over ``n`` images."""

    top1: float
    top5: float
    n: int

    def __str__(self) -> str:
        return f"top-1 {self.top1:.2f} %, top-5 {self.top5:.2f} % on {self.n} images"


def accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 128,
             device: str | torch.device = "cpu") -> Accuracy:
    """Evaluate ``model`` (eval mode, no grad) on ``data``."""
    model = model.to(device).eval()
    hit1 = hit5 = n = 0
    with torch.inference_mode():
        for x, y in DataLoader(data, batch_size=batch_size):
            logits = model(x.to(device))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            hit1 += int((top[:, 0] == y).sum())
            hit5 += int((top == y[:, None]).any(dim=1).sum())
            n += len(y)
    return Accuracy(100.0 * hit1 / max(n, 1), 100.0 * hit5 / max(n, 1), n)


@dataclass(frozen=True)
class LatencyComparison:
    """Paired latency of an original and a converted model under one timing protocol."""

    spec: TimingSpec
    original_ms: tuple[float, ...]
    converted_ms: tuple[float, ...]
    flops_ratio: float

    @property
    def ratios(self) -> list[float]:
        """Converted / original of each round, sorted (paired within each round)."""
        return sorted(c / o for o, c in zip(self.original_ms, self.converted_ms, strict=True))

    @property
    def latency_ratio(self) -> float:
        """Median over rounds of converted / original."""
        return self.ratios[len(self.ratios) // 2]

    @property
    def ratio_range(self) -> tuple[float, float]:
        """Smallest and largest per-round latency ratio (how much the rounds disagree)."""
        return self.ratios[0], self.ratios[-1]

    @property
    def speedup(self) -> float:
        return 1.0 / self.latency_ratio

    @property
    def original_median_ms(self) -> float:
        return sorted(self.original_ms)[len(self.original_ms) // 2]

    @property
    def converted_median_ms(self) -> float:
        return sorted(self.converted_ms)[len(self.converted_ms) // 2]

    def __str__(self) -> str:
        lo, hi = self.ratio_range
        return (f"FLOPs ratio {self.flops_ratio:.3f}, latency ratio {self.latency_ratio:.3f} "
                f"(rounds {lo:.3f}-{hi:.3f}; speed-up {self.speedup:.2f}x) on "
                f"{self.spec.device_name}")


def compare_latency(original: nn.Module, converted: nn.Module, spec: TimingSpec, *,
                    flops_ratio: float, rounds: int = 3) -> LatencyComparison:
    """Time both models alternately for ``rounds`` rounds (the profiler's protocol); with
    ``spec.interleave`` (CPU), each round interleaves their blocks.

    The models are copied first: timing moves a model to the spec's device and dtype.
    """
    original, converted = copy.deepcopy(original), copy.deepcopy(converted)
    orig, conv = [], []
    for r in range(rounds):
        if spec.interleave:
            res = time_model(converted, spec.for_variant("converted"), reference=original)
            orig.append(res.ref_median_ms)
            conv.append(res.median_ms)
            continue
        first, second = (original, converted) if r % 2 == 0 else (converted, original)
        a = time_model(first, spec.for_variant("original" if first is original else "converted"))
        b = time_model(second, spec.for_variant("converted" if first is original else "original"))
        o, c = (a, b) if first is original else (b, a)
        orig.append(o.median_ms)
        conv.append(c.median_ms)
    return LatencyComparison(spec, tuple(orig), tuple(conv), flops_ratio)


def bench_converted(model_dir: str | Path, timing: TimingOptions, *, rounds: int = 3
                    ) -> LatencyComparison:
    """Time a converted model directory against its original network (random init, the same
    architecture) under ``timing`` at the plan's input size; FLOPs ratio included."""
    from gator_hw.accounting import flop_counter_flops
    from gator_hw.io import load, load_plan
    from gator_hw.network import load_network

    doc = load_plan(model_dir)
    net = load_network(doc["model"], input_size=doc["input_size"], num_classes=doc["num_classes"])
    small = load(model_dir)
    shape = net.input_shape
    ratio = flop_counter_flops(small, shape) / flop_counter_flops(net.model, shape)
    spec = dataclasses.replace(timing, input_size=doc["input_size"]).spec(doc["model"])
    return compare_latency(net.model, small, spec, flops_ratio=ratio, rounds=rounds)
