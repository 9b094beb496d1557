"""Multi-head self-attention with its own widths: what a pruned ``nn.MultiheadAttention`` becomes.

``nn.MultiheadAttention`` ties its input and output features and every head's query/key and
value channels to one ``embed_dim``, so a pruned attention cannot be one. ``SlimAttention``
keeps the original's call (``attn(x, x, x, need_weights=False) -> (out, None)``, batch first)
and its scale ``1 / sqrt(original head dim)``, with separate q/k/v projections of any width
(the same per head). ``gator_hw.masking.masked_attention`` is the reference it must equal: the
original module with channels scaled where attention reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gator_hw.errors import GatorError

__all__ = ["SlimAttention", "attend"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
           dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v per head; (batch, tokens, heads * dim) in and out."""
    b, n = q.shape[:2]
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v).transpose(1, 2).reshape(b, n, -1)


class SlimAttention(nn.Module):
    """Batch-first self-attention with widths of its own (see the module docstring)."""

    def __init__(self, in_features: int, qk_features: int, v_features: int, out_features: int,
                 num_heads: int, scale: float, *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if qk_features % num_heads or v_features % num_heads:
            raise GatorError(f"attention keeps {qk_features} query and {v_features} value "
                             f"channels, not a multiple of its {num_heads} heads")
        self.q_proj = nn.Linear(in_features, qk_features, bias=bias)
        self.k_proj = nn.Linear(in_features, qk_features, bias=bias)
        self.v_proj = nn.Linear(in_features, v_features, bias=bias)
        self.out_proj = nn.Linear(v_features, out_features)
        self.num_heads, self.scale, self.dropout = num_heads, scale, dropout
        self.batch_first = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention``'s call; masks are not supported, weights are None."""
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise GatorError("SlimAttention does not take attention masks (it was converted "
                             "from a self-attention called without them)")
        p = self.dropout if self.training else 0.0
        out = attend(self.q_proj(query), self.k_proj(key), self.v_proj(value), self.num_heads,
                     self.scale, p)
        return self.out_proj(out), None

    @classmethod
    def from_mha(cls, m: nn.MultiheadAttention, in_idx: torch.Tensor, qk_idx: torch.Tensor,
                 v_idx: torch.Tensor, out_idx: torch.Tensor) -> SlimAttention:
        """``m`` keeping input features ``in_idx``, query/key channels ``qk_idx``, value
        channels ``v_idx`` (each the same count per head) and output features ``out_idx``."""
        e = m.embed_dim
        bias = m.in_proj_bias is not None
        new = cls(len(in_idx), len(qk_idx), len(v_idx), len(out_idx), m.num_heads,
                  1.0 / math.sqrt(e // m.num_heads), bias=bias, dropout=m.dropout)
        w, b = m.in_proj_weight.detach(), m.in_proj_bias
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for lin, rows in ((new.q_proj, qk_idx), (new.k_proj, qk_idx + e),
                              (new.v_proj, v_idx + 2 * e)):
                lin.weight.copy_(w[rows][:, in_idx])
                if bias:
                    lin.bias.copy_(b.detach()[rows])
            new.out_proj.weight.copy_(m.out_proj.weight.detach()[out_idx][:, v_idx])
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias.detach()[out_idx])
            else:
                new.out_proj.bias = None
        return new.train(m.training)
