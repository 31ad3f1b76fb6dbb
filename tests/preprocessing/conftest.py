"""Shared helpers for preprocessing tests: small synthetic volumes and a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest


def blob_volume(shape=(24, 28, 20), seed=0) -> np.ndarray:
    """A float64 ellipsoid of varied positive intensities (1..200) on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    inside = np.sum((grid / [0.8, 0.85, 0.9]) ** 2, axis=-1) <= 1.0
    values = np.round(rng.uniform(1, 200, size=shape))
    return np.where(inside, values, 0.0)


def reference_slices(canonical: np.ndarray, min_fraction: float, clip, size: int, margin: int):
    """Independent float64 reimplementation of the contract for a RAS+ volume, no resampling,
    "nonzero" mask, no shrinking: returns (slices uint8, kept indices, fg_mean, fg_std)."""
    mask = canonical != 0
    fractions = mask.sum(axis=(0, 1)) / (canonical.shape[0] * canonical.shape[1])
    kept = np.flatnonzero(fractions >= min_fraction)
    fg = canonical[mask].astype(np.float64)
    lo, hi = np.percentile(fg, clip)
    clipped = np.clip(fg, lo, hi)
    fg_mean = 1 + 254 * (clipped.mean() - lo) / (hi - lo)
    fg_std = 254 * clipped.std() / (hi - lo)
    display = [canonical[:, ::-1, k].T for k in kept]
    display_mask = [mask[:, ::-1, k].T for k in kept]
    union = np.any(display_mask, axis=0)
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, union.shape[0])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, union.shape[1])
    out = np.zeros((len(kept), size, size), np.uint8)
    h, w = r1 - r0, c1 - c0
    top, left = (size - h) // 2, (size - w) // 2
    for i, (img, m) in enumerate(zip(display, display_mask)):
        u = np.round(1 + 254 * (np.clip(img[r0:r1, c0:c1], lo, hi) - lo) / (hi - lo))
        out[i, top : top + h, left : left + w] = np.where(m[r0:r1, c0:c1], u, 0)
    return out, kept, fg_mean, fg_std


@pytest.fixture
def blob():
    return blob_volume


@pytest.fixture
def reference():
    return reference_slices
