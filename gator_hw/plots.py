"""Figures from profile tables, fitted cost models and configs (PNG and SVG).

Every figure is titled with the model, device, batch and dtype it shows. Nothing here computes
a measurement: it draws what the tables, the cost model and the config already hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from gator_hw.atomic import atomic_path  # noqa: E402
from gator_hw.costmodel.dataset import Samples  # noqa: E402

__all__ = ["flops_vs_latency", "label", "multipliers_bar", "parity", "save_figure", "share_bars"]


def label(ctx: dict) -> str:
    """``model on device, batch B, dtype`` for titles."""
    layout = ", channels-last" if ctx.get("channels_last") else ""
    return (f"{ctx.get('model', '?')} on {ctx.get('device', '?')}, batch {ctx.get('batch', '?')}, "
            f"{ctx.get('dtype', '?')}{layout}")


def save_figure(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` atomically; close the figure."""
    out = []
    for ext in ("png", "svg"):
        path = Path(out_dir) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=130, bbox_inches="tight")
        out.append(path)
    plt.close(fig)
    return out


def flops_vs_latency(samples: Samples, flops: np.ndarray, ctx: dict):
    """Measured latency against FLOPs for every timed net, with the FLOPs-linear fit."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    gf = flops / 1e9
    for kind, marker in (("edge", "o"), ("random", "^"), ("baseline", "*")):
        m = samples.kind == kind
        if m.any():
            ax.scatter(gf[m], samples.latency_ms[m], marker=marker, s=60 if kind == "baseline"
                       else 18, label=f"{kind} ({int(m.sum())})", alpha=0.8)
    a, b = np.polyfit(gf, samples.latency_ms, 1)
    xs = np.linspace(gf.min(), gf.max(), 50)
    rho = spearmanr(gf, samples.latency_ms).statistic
    ax.plot(xs, a * xs + b, "k--", lw=1, label=f"FLOPs-linear fit (Spearman rho {rho:.3f})")
    ax.set_xlabel("GFLOPs per forward (batch)")
    ax.set_ylabel("measured latency (ms)")
    ax.set_title(f"FLOPs vs latency\n{label(ctx)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def parity(measured: np.ndarray, predicted: dict[str, np.ndarray], ctx: dict):
    """Predicted against measured latency of held-out nets, with a +-10 % band."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    lo = min(measured.min(), *(p.min() for p in predicted.values())) * 0.95
    hi = max(measured.max(), *(p.max() for p in predicted.values())) * 1.05
    xs = np.array([lo, hi])
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.85", label="+-10 %")
    ax.plot(xs, xs, "k-", lw=0.8)
    for name, p in predicted.items():
        mape = float(np.mean(np.abs(p - measured) / measured) * 100)
        ax.scatter(measured, p, s=20, label=f"{name} (MAPE {mape:.1f} %)", alpha=0.85)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"held-out random nets\n{label(ctx)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def share_bars(names: Sequence[str], flops_share: np.ndarray, latency_share: np.ndarray,
               ctx: dict):
    """Per edge: share of FLOPs and of latency saved by its half-width probe."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(names)), 4.2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, flops_share, 0.4, label="FLOPs saved (%)")
    ax.bar(x + 0.2, latency_share, 0.4, label="latency saved (%)")
    ax.set_xticks(x, [str(i) for i in range(len(names))], fontsize=7)
    ax.set_xlabel("edge (half width)")
    ax.set_ylabel("% of the full network")
    ax.set_title(f"per-edge FLOPs vs latency saving\n{label(ctx)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def multipliers_bar(names: Sequence[str], multipliers: Sequence[float], ctx: dict):
    """Latency multiplier per edge (1 = saves latency in proportion to its FLOPs)."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(names)), 3.8))
    x = np.arange(len(names))
    ax.bar(x, multipliers, color="tab:purple")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [str(i) for i in range(len(names))], fontsize=7)
    ax.set_xlabel("edge")
    ax.set_ylabel("latency % / FLOPs %")
    ax.set_title(f"edge multipliers\n{label(ctx)}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return fig
