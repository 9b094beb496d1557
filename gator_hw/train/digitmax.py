"""``digitmax``: a built-in task where accuracy is at stake, composed from scikit-learn's digits.

Each 64 px (by default) canvas holds two handwritten digits at random positions and scales among
clutter (scaled fragments of other digits) and pixel noise; the label is the larger of the two
(10 classes), so a network must find and read both digits. Nothing is downloaded: the strokes are
scikit-learn's bundled 1797 8x8 digits. Training and validation canvases are drawn from disjoint
source images (a stratified split of the 1797), so no validation stroke was ever seen in
training. Everything is a function of the seed.

The digits task saturates (every net ~99 %); this one does not: an unpruned ResNet-18 at 64 px
reaches 80-95 % in the peer benchmark's base training (``benchmarks/compare_peers.py``: 8 epochs,
AdamW), and pruning costs measurable accuracy. (A sum label was tried first: ResNet-18 learns it
too slowly for a CPU benchmark, ~20 % after 40k images; the maximum is what global pooling reads
off per-digit detectors, so it is learnt in a few epochs and still needs both digits.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGITMAX_CLASSES", "DigitMaxSplit", "make_digitmax"]

#: Labels are the larger of two digits: 0..9.
DIGITMAX_CLASSES = 10

_VAL_SOURCE_SHARE = 0.35  # of the 1797 source digits, kept for validation canvases only


@dataclass(frozen=True)
class DigitMaxSplit:
    """Canvases ``(N, 1, S, S)`` in [0, 1], labels ``(N,)`` and the source digits each used.

    ``sources`` is ``(N, 2 + clutter)``: indices into ``sklearn.datasets.load_digits()`` of the
    two labelled digits, then of the clutter fragments (-1 where a canvas has fewer)."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: np.ndarray


def _source_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundled digits in [0, 1] and their labels; disjoint train / val index sets."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    tr, va = train_test_split(idx, test_size=_VAL_SOURCE_SHARE, random_state=seed,
                              stratify=d.target)
    return (d.images / 16.0).astype(np.float32), d.target, np.sort(tr), np.sort(va)


def _scaled(images: np.ndarray, sizes: range) -> dict[int, np.ndarray]:
    """Every source digit upsampled (bilinear) to each side length in ``sizes``."""
    x = torch.from_numpy(images).unsqueeze(1)
    return {s: F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)[:, 0].numpy()
            for s in sizes}


@dataclass(frozen=True)
class _Style:
    """How a canvas is drawn (sides in pixels at 64 px; scaled with the canvas)."""

    digit: tuple[int, int] = (12, 24)
    fragment: tuple[int, int] = (8, 16)
    fragment_crop: int = 4  # side of the 8x8 source window a fragment shows
    clutter: tuple[int, int] = (4, 7)  # fragments per canvas, inclusive
    noise: float = 0.18


def _render(rng: np.random.Generator, n: int, pool: np.ndarray, images: np.ndarray,
            targets: np.ndarray, size: int, style: _Style
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = size / 64.0
    dmin, dmax = (max(4, round(v * k)) for v in style.digit)
    fmin, fmax = (max(3, round(v * k)) for v in style.fragment)
    digits = _scaled(images, range(dmin, dmax + 1))
    crops = _scaled(images, range(fmin, fmax + 1))
    canvas = np.zeros((n, size, size), np.float32)
    max_clutter = style.clutter[1]
    sources = np.full((n, 2 + max_clutter), -1, np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        img = canvas[i]
        n_frag = int(rng.integers(style.clutter[0], style.clutter[1] + 1))
        for j in range(n_frag):  # clutter first: the digits are drawn over it
            src = int(rng.choice(pool))
            s = int(rng.integers(fmin, fmax + 1))
            c = max(1, round(style.fragment_crop * s / 8))
            oy, ox = (int(v) for v in rng.integers(0, s - c + 1, 2))
            y, x = (int(v) for v in rng.integers(0, size - c + 1, 2))
            patch = crops[s][src, oy : oy + c, ox : ox + c] * rng.uniform(0.4, 0.9)
            np.maximum(img[y : y + c, x : x + c], patch, out=img[y : y + c, x : x + c])
            sources[i, 2 + j] = src
        boxes: list[tuple[int, int, int]] = []
        for j in range(2):
            src = int(rng.choice(pool))
            s = int(rng.integers(dmin, dmax + 1))
            for _ in range(20):  # the two digits may touch but not cover each other
                y, x = (int(v) for v in rng.integers(0, size - s + 1, 2))
                if all(abs(y - by) * 2 > (s + bs) * 0.75 or abs(x - bx) * 2 > (s + bs) * 0.75
                       for by, bx, bs in boxes):
                    break
            boxes.append((y, x, s))
            np.maximum(img[y : y + s, x : x + s], digits[s][src], out=img[y : y + s, x : x + s])
            sources[i, j] = src
            labels[i] = max(labels[i], int(targets[src]))
    canvas += rng.normal(0.0, style.noise, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0), labels, sources


def make_digitmax(size: int = 64, seed: int = 0, *, n_train: int = 12000,
                  n_val: int = 2500) -> tuple[DigitMaxSplit, DigitMaxSplit]:
    """Training and validation canvases for ``seed`` (identical for equal arguments)."""
    images, targets, tr, va = _source_split(seed)
    style = _Style()
    out = []
    for stream, (n, pool) in enumerate(((n_train, tr), (n_val, va))):
        rng = np.random.default_rng([seed, stream])
        x, y, src = _render(rng, n, pool, images, targets, size, style)
        out.append(DigitMaxSplit(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y), src))
    return out[0], out[1]
