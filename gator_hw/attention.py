"""Multi-head self-attention with its own widths: what a pruned ``nn.MultiheadAttention``
or a pruned Swin window attention becomes.

``nn.MultiheadAttention`` ties its input and output features and every head's query/key and
value channels to one ``embed_dim``, so a pruned attention cannot be one. ``SlimAttention``
keeps the original's call (``attn(x, x, x, need_weights=False) -> (out, None)``, batch first)
and its scale ``1 / sqrt(original head dim)``, with separate q/k/v projections of any width
(the same per head). ``gator_hw.masking.masked_attention`` is the reference it must equal: the
original module with channels scaled where attention reads them.

torchvision's Swin reads its width from its input (``C // num_heads`` is both its head dim
and its scale), so ``SlimWindowAttention`` replaces its ``ShiftedWindowAttention(V2)`` the same
way: the original's call ``attn(x)`` on (B, H, W, C) features, windows, shift, heads, relative
position bias and logit scale (V2), with q/k/v projections of their own widths
(``gator_hw.masking.masked_window_attention`` is its reference). Both share the window code
below (``to_windows``, ``shift_mask``, ``window_attend``, ``from_windows``), which computes
what torchvision's ``shifted_window_attention`` does.

torchvision's MaxViT reshapes its attention's output to its input's width and splits heads by
its stored head dim, so ``SlimRelativeAttention`` replaces its
``RelativePositionalMultiHeadAttention``: the original's call ``attn(x)`` on (B, windows,
tokens, C) features (MaxViT partitions the map itself), heads, relative position bias and
score scale ``1 / sqrt(original C)``, with q/k/v projections of their own widths
(``gator_hw.masking.masked_relative_attention`` is its reference; both use ``window_attend``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gator_hw.errors import GatorError

__all__ = ["SlimAttention", "SlimRelativeAttention", "SlimWindowAttention", "Windows", "attend",
           "from_windows", "maxvit_position_bias", "relative_attend", "shift_mask",
           "swin_position_bias", "swin_qkv_bias", "swin_scale", "to_windows", "window_attend"]


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


# -------------------------------------------------------------------------------------------
# Swin: torchvision's shifted window attention
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """Where ``to_windows`` put a (B, H, W, C) map's tokens: its batch and size, its size
    zero-padded to whole windows, the window and the cyclic shift it applied."""

    batch: int
    height: int
    width: int
    padded: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]

    @property
    def count(self) -> int:
        """Windows per sample."""
        return (self.padded[0] // self.window[0]) * (self.padded[1] // self.window[1])


def to_windows(x: torch.Tensor, window: Sequence[int], shift: Sequence[int]
               ) -> tuple[torch.Tensor, Windows]:
    """(B, H, W, C) -> (B * windows, tokens per window, C), as torchvision's
    ``shifted_window_attention`` partitions: zero-padded at the bottom and right to whole
    windows, rolled back by ``shift`` (no shift along a dimension that one window covers)."""
    b, h, w, _ = x.shape
    x = F.pad(x, (0, 0, 0, -w % window[1], 0, -h % window[0]))
    ph, pw = x.shape[1], x.shape[2]
    shift = (shift[0] if window[0] < ph else 0, shift[1] if window[1] < pw else 0)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(b, ph // window[0], window[0], pw // window[1], window[1], x.shape[-1])
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], x.shape[-1])
    return x, Windows(b, h, w, (ph, pw), (window[0], window[1]), shift)


def from_windows(y: torch.Tensor, grid: Windows) -> torch.Tensor:
    """The inverse of ``to_windows``: (B * windows, tokens, C) -> (B, H, W, C)."""
    (ph, pw), (wh, ww) = grid.padded, grid.window
    y = y.view(grid.batch, ph // wh, pw // ww, wh, ww, y.shape[-1])
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(grid.batch, ph, pw, y.shape[-1])
    if sum(grid.shift) > 0:
        y = torch.roll(y, shifts=grid.shift, dims=(1, 2))
    return y[:, :grid.height, :grid.width, :].contiguous()


def _bands(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Which of the three bands of a rolled map each row (or column) lies in: before the last
    window, the last window's rows that were there before the roll, the rows it wrapped round.
    (Unrolled, the last window is one band of its own: no window mixes bands.)"""
    i = torch.arange(size, device=device)
    return (i >= size - window).long() + (i >= size - shift).long()


def shift_mask(grid: Windows, like: torch.Tensor) -> torch.Tensor | None:
    """(windows, tokens, tokens) added to the scores of a shifted map (torchvision's mask): 0
    between tokens of one region, -100 between tokens the roll brought together; None when
    nothing was shifted."""
    if sum(grid.shift) == 0:
        return None
    (ph, pw), (wh, ww) = grid.padded, grid.window
    rows = _bands(ph, wh, grid.shift[0], like.device)
    cols = _bands(pw, ww, grid.shift[1], like.device)
    region = (rows[:, None] * 3 + cols[None, :]).view(ph // wh, wh, pw // ww, ww)
    region = region.permute(0, 2, 1, 3).reshape(-1, wh * ww)
    apart = region[:, None, :] != region[:, :, None]
    return torch.zeros(apart.shape, dtype=like.dtype, device=like.device).masked_fill(apart, -100.0)


def window_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  bias: torch.Tensor, mask: torch.Tensor | None, *, scale: float,
                  logit_scale: torch.Tensor | None = None, dropout: float = 0.0,
                  training: bool = False) -> torch.Tensor:
    """Per window and head: softmax(scores + bias (+ mask)) v, the scores ``q k^T * scale``
    (Swin V1) or, given ``logit_scale`` (V2), cosine similarities times
    ``exp(min(logit_scale, log 100))``; (B * windows, tokens, heads * dim) in and out."""
    n, t = q.shape[:2]
    q, k, v = (z.reshape(n, t, heads, -1).transpose(1, 2) for z in (q, k, v))
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * scale).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if mask is not None:
        w = mask.shape[0]
        attn = (attn.view(n // w, w, heads, t, t) + mask[None, :, None]).view(n, heads, t, t)
    attn = F.dropout(F.softmax(attn, dim=-1), p=dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(n, t, -1)


def swin_scale(m: nn.Module) -> float:
    """The score scale of torchvision's window attention ``m``: 1 / sqrt(its head dim)."""
    return (m.proj.in_features // m.num_heads) ** -0.5


def swin_position_bias(m: nn.Module) -> torch.Tensor:
    """(1, heads, tokens, tokens): the relative position bias of a Swin window attention
    (``ShiftedWindowAttention(V2)`` or ``SlimWindowAttention``), as torchvision computes it:
    gathered from its table (V1) or from its continuous-position MLP (``cpb_mlp``, V2)."""
    from torchvision.models.swin_transformer import _get_relative_position_bias

    if getattr(m, "cpb_mlp", None) is None:
        return _get_relative_position_bias(m.relative_position_bias_table,
                                           m.relative_position_index, m.window_size)
    table = m.cpb_mlp(m.relative_coords_table).view(-1, m.num_heads)
    bias = _get_relative_position_bias(table, m.relative_position_index, m.window_size)
    return 16 * torch.sigmoid(bias)


def swin_qkv_bias(m: nn.Module, widths: Sequence[int]) -> torch.Tensor | None:
    """The bias that window attention ``m``'s packed q/k/v projection adds (``widths``: its q,
    k and v parts): Swin V2 (cosine scores) leaves the keys unbiased, as torchvision does."""
    bias = m.qkv.bias
    if getattr(m, "logit_scale", None) is None or bias is None:
        return bias
    q, k, v = bias.split(list(widths))
    return torch.cat([q, torch.zeros_like(k), v])


class SlimWindowAttention(nn.Module):
    """torchvision's shifted window attention (Swin V1 or V2) with widths of its own: what a
    pruned ``ShiftedWindowAttention(V2)`` becomes. Called as the original (``attn(x)`` on
    (B, H, W, C) features); its packed q/k/v projection writes any number of query/key and of
    value channels (the same per head); the original's heads, windows, shift, relative
    position bias, logit scale (V2) and score scale ``1 / sqrt(original head dim)`` (V1)."""

    def __init__(self, source: nn.Module, in_idx: torch.Tensor, qk_idx: torch.Tensor,
                 v_idx: torch.Tensor, out_idx: torch.Tensor) -> None:
        """``source`` keeping input features ``in_idx``, query/key channels ``qk_idx``, value
        channels ``v_idx`` (each the same count per head) and output features ``out_idx``."""
        super().__init__()
        self.num_heads, self.scale = source.num_heads, swin_scale(source)
        self.window_size, self.shift_size = list(source.window_size), list(source.shift_size)
        self.attention_dropout, self.dropout = source.attention_dropout, source.dropout
        self.widths, self.qkv = _packed_qkv(source.qkv, source.num_heads, in_idx, qk_idx, v_idx,
                                            "window attention")
        self.proj = _sliced(source.proj, out_idx, v_idx)
        self.register_buffer("relative_position_index",
                             source.relative_position_index.detach().clone())
        if getattr(source, "cpb_mlp", None) is None:  # V1: a table of biases
            self.relative_position_bias_table = _copy(source.relative_position_bias_table)
            self.cpb_mlp = self.logit_scale = None
        else:  # V2: cosine scores, the bias from an MLP of the relative coordinates
            self.register_buffer("relative_coords_table",
                                 source.relative_coords_table.detach().clone())
            self.cpb_mlp = copy.deepcopy(source.cpb_mlp)
            self.logit_scale = _copy(source.logit_scale)
        self.train(source.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, in features) -> (B, H, W, out features)."""
        win, grid = to_windows(x, self.window_size, self.shift_size)
        qkv = F.linear(win, self.qkv.weight, swin_qkv_bias(self, self.widths))
        q, k, v = qkv.split(self.widths, dim=-1)
        out = window_attend(q, k, v, self.num_heads, swin_position_bias(self),
                            shift_mask(grid, win), scale=self.scale, logit_scale=self.logit_scale,
                            dropout=self.attention_dropout, training=self.training)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        return from_windows(out, grid)


# -------------------------------------------------------------------------------------------
# MaxViT: torchvision's relative positional multi-head attention
# -------------------------------------------------------------------------------------------
def maxvit_position_bias(m: nn.Module) -> torch.Tensor:
    """(1, heads, tokens, tokens): the relative position bias of a MaxViT attention
    (``RelativePositionalMultiHeadAttention`` or ``SlimRelativeAttention``), by torchvision's
    own method."""
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    return RelativePositionalMultiHeadAttention.get_relative_positional_bias(m)


def relative_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    scale: float, bias: torch.Tensor) -> torch.Tensor:
    """MaxViT's attention within each window and head: softmax(q k^T * scale + bias) v;
    (B, windows, tokens, heads * dim) in and out."""
    b, g, p = q.shape[:3]
    flat = (t.reshape(b * g, p, -1) for t in (q, k, v))
    return window_attend(*flat, heads, bias, None, scale=scale).reshape(b, g, p, -1)


class SlimRelativeAttention(nn.Module):
    """torchvision MaxViT's attention with widths of its own: what a pruned
    ``RelativePositionalMultiHeadAttention`` becomes. Called as the original (``attn(x)`` on
    (B, windows, tokens, C) features); its packed q/k/v projection writes any number of
    query/key and of value channels (the same per head); the original's heads, relative position
    bias and score scale (``1 / sqrt(C)`` of the original width C)."""

    def __init__(self, source: nn.Module, in_idx: torch.Tensor, qk_idx: torch.Tensor,
                 v_idx: torch.Tensor, out_idx: torch.Tensor) -> None:
        """``source`` keeping input features ``in_idx``, query/key channels ``qk_idx``, value
        channels ``v_idx`` (each the same count per head) and output features ``out_idx``."""
        super().__init__()
        self.n_heads, self.scale_factor = source.n_heads, source.scale_factor
        self.max_seq_len = source.max_seq_len
        self.widths, self.to_qkv = _packed_qkv(source.to_qkv, source.n_heads, in_idx, qk_idx,
                                               v_idx, "MaxViT attention")
        self.merge = _sliced(source.merge, out_idx, v_idx)
        self.relative_position_bias_table = _copy(source.relative_position_bias_table)
        self.register_buffer("relative_position_index",
                             source.relative_position_index.detach().clone())
        self.train(source.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, windows, tokens, in features) -> (B, windows, tokens, out features)."""
        q, k, v = self.to_qkv(x).split(self.widths, dim=-1)
        out = relative_attend(q, k, v, self.n_heads, self.scale_factor,
                              maxvit_position_bias(self))
        return self.merge(out)


def _copy(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def _packed_qkv(qkv: nn.Linear, heads: int, in_idx: torch.Tensor, qk_idx: torch.Tensor,
                v_idx: torch.Tensor, what: str) -> tuple[list[int], nn.Linear]:
    """A packed q/k/v projection (rows q, k, v of one width each) keeping input features
    ``in_idx``, query/key channels ``qk_idx`` and value channels ``v_idx`` (the same count per
    head), and the widths of its q, k and v parts."""
    if len(qk_idx) % heads or len(v_idx) % heads:
        raise GatorError(f"{what} keeps {len(qk_idx)} query and {len(v_idx)} value channels, "
                         f"not a multiple of its {heads} heads")
    c = qkv.out_features // 3
    rows = torch.cat([qk_idx, qk_idx + c, v_idx + 2 * c])
    return [len(qk_idx), len(qk_idx), len(v_idx)], _sliced(qkv, rows, in_idx)


def _sliced(m: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> nn.Linear:
    """A Linear with ``m``'s weight rows ``rows`` and columns ``cols`` (and bias ``rows``)."""
    w = m.weight.detach()
    lin = nn.Linear(len(cols), len(rows), bias=m.bias is not None, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w[rows][:, cols])
        if m.bias is not None:
            lin.bias.copy_(m.bias.detach()[rows])
    return lin
