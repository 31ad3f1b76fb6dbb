"""Foreground masks: nonzero voxels for skull-stripped data, or an intensity threshold for heads.

Callers pass volumes whose NaN/Inf voxels were already zeroed (see intensity.zero_nonfinite)
together with the finite mask, so non-finite voxels are background for every method.
"""

from __future__ import annotations

import numpy as np

OTSU_BINS = 1024


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold: the histogram cut maximising the between-class variance.

    Returns the upper edge of the last background bin, so ``values > threshold`` is the
    brighter class. ``values`` must be finite and hold at least two distinct intensities.
    """
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise ValueError("Otsu's threshold needs at least two distinct intensities")
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts, dtype=np.float64)  # voxels at or below each cut
    s0 = np.cumsum(counts * centres)
    total, total_sum = w0[-1], s0[-1]
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (w0 * w1) * (s0 / w0 - (total_sum - s0) / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)  # the last cut leaves the bright class empty
    return float(edges[int(np.argmax(between)) + 1])


def foreground_mask(
    data: np.ndarray, method: str, percentile: float = 10.0, finite: np.ndarray | None = None
) -> np.ndarray:
    """Boolean foreground mask of a 3D volume.

    "nonzero": every voxel != 0. "otsu": voxels above Otsu's threshold of the finite voxels.
    "percentile": voxels above the ``percentile``-th percentile of the finite voxels.
    ``finite`` (the voxels that were finite before zeroing) excludes NaN/Inf from all methods.
    """
    if method == "nonzero":
        mask = data != 0
    elif method in ("otsu", "percentile"):
        values = data if finite is None else data[finite]
        if values.size == 0 or values.min() == values.max():
            return np.zeros(data.shape, bool)
        if method == "otsu":
            threshold = otsu_threshold(values)
        else:
            threshold = float(np.percentile(values, percentile))
        mask = data > threshold
    else:
        raise ValueError(f"mask method: expected 'nonzero', 'otsu' or 'percentile', got {method!r}")
    if finite is not None:
        mask &= finite
    return mask
