"""Which axial slices of a RAS+ volume to keep, from their foreground fractions."""

from __future__ import annotations

import numpy as np

from braindino_jax.preprocessing.orientation import reduce_unreversed


def foreground_fractions(mask: np.ndarray, plane_size: int | None = None) -> np.ndarray:
    """Fraction of foreground pixels in each axial slice (last axis) of a 3D mask, float64 [Z].

    ``plane_size`` is the pixel count of a whole slice when ``mask`` is a crop of the volume
    that holds all its foreground (default: the mask's own slice size).
    """
    counts = reduce_unreversed(_count_true, mask, axis=(0, 1))
    return counts / float(plane_size if plane_size is not None else mask.shape[0] * mask.shape[1])


def select_slices(
    fractions: np.ndarray, min_fraction: float, n_slices: int | None = None
) -> np.ndarray:
    """Indices (int32, ascending) of the axial slices to keep.

    Threshold mode (``n_slices`` None): every slice whose fraction is >= ``min_fraction``.
    Sampling mode: ``n_slices`` indices spaced uniformly from the first to the last slice that
    passes the threshold (rounded to the nearest slice), as BrainDINO's probes do with N = 128.
    When N exceeds that span some slices repeat, so every volume still yields exactly N.
    Returns an empty array when no slice passes.
    """
    passing = np.flatnonzero(fractions >= min_fraction)
    if n_slices is None or passing.size == 0:
        return passing.astype(np.int32)
    positions = np.linspace(passing[0], passing[-1], n_slices)
    return np.floor(positions + 0.5).astype(np.int32)


def _count_true(mask: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """True count along ``axis``: a byte sum, several times faster than np.count_nonzero's."""
    return mask.view(np.uint8).sum(axis=axis, dtype=np.int64)
