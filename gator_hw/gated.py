"""A gated training checkpoint -> the network, its kept channels and a verified conversion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gator_hw.convert import convert
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.network import Network, load_network
from gator_hw.train.checkpoint import check_signature, load_checkpoint

__all__ = ["ConvertedRun", "convert_checkpoint", "load_gated"]

#: largest allowed |converted - gated| / max|gated| on the check batch
CONVERT_RTOL = 1e-4


@dataclass(frozen=True)
class ConvertedRun:
    """The original network, the converted model, its plan and the equality check."""

    net: Network
    model: torch.nn.Module
    keep: dict[int, list[int]]
    rel_error: float
    source: Path
    meta: dict

    @property
    def flops_ratio(self) -> float:
        """Converted / original FLOPs (``FlopCounterMode``, one input)."""
        from gator_hw.accounting import flop_counter_flops

        shape = self.net.input_shape
        return flop_counter_flops(self.model, shape) / flop_counter_flops(self.net.model, shape)

    @property
    def params_ratio(self) -> float:
        """Converted / original parameter count."""
        return _params(self.model) / _params(self.net.model)

    @property
    def emptied(self) -> list[str]:
        """Edges that kept no channel (their branches were folded away)."""
        return [self.net.graph.edges[g].name for g, k in self.keep.items() if not k]

    def summary(self) -> str:
        """One line: FLOPs and params kept, branches removed, the equality check."""
        return (f"converted {self.net.name}: FLOPs {100 * self.flops_ratio:.1f} %, params "
                f"{100 * self.params_ratio:.1f} % of the original; {len(self.emptied)} branches "
                f"removed; equals the gated model to {self.rel_error:.1e} (relative)")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_gated(path: str | Path) -> tuple[Network, GateSet, dict, Path]:
    """Rebuild the network of a checkpoint (run folder or NAME.json) with its weights and gates."""
    ckpt = load_checkpoint(path)
    sig = ckpt.meta.get("signature") or {}
    if "model" not in sig:
        raise GatorError(f"{ckpt.path} has no model signature; it is not a gated checkpoint")
    head = ckpt.prefixed("model")
    num_classes = ckpt.meta.get("num_classes")
    if num_classes is None:  # older checkpoints: the classifier's bias length
        biases = [v for k, v in head.items() if k.endswith("bias") and v.dim() == 1]
        num_classes = int(biases[-1].numel()) if biases else 1000
    net = load_network(sig["model"], input_size=int(sig["input_shape"][-1]),
                       num_classes=int(num_classes))
    check_signature(ckpt.meta, net.graph, str(ckpt.path))
    try:
        net.model.load_state_dict(head)
    except RuntimeError as exc:
        raise GatorError(f"{ckpt.path} does not fit {sig['model']}: {str(exc)[:200]}") from None
    gates = GateSet.from_graph(net.graph)
    gates.load_state_dict(ckpt.prefixed("gates"))
    return net, gates, ckpt.meta, ckpt.path


def convert_checkpoint(path: str | Path, batch: torch.Tensor | None = None) -> ConvertedRun:
    """Convert a gated checkpoint and check it equals the gated model (eval mode).

    ``batch`` is the check input (a real batch; default: a seeded random one).
    """
    net, gates, meta, source = load_gated(path)
    keep = gates.kept_indices()
    model = net.model.eval()
    small = convert(model, net.graph, keep)
    x = batch if batch is not None else torch.randn(
        (8, *net.input_shape[1:]), generator=torch.Generator().manual_seed(0))
    ref = gates.gated_output(model, net.graph, x)
    with torch.no_grad():
        out = small(x)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > CONVERT_RTOL:
        raise GatorError(
            f"the converted model differs from the gated one by {err:.2e} (limit {CONVERT_RTOL:g})"
            "; this is a bug in gator-hw, please report it with the checkpoint"
        )
    return ConvertedRun(net, small, keep, err, Path(source), meta)
