"""Robust intensity scaling to uint8 storage, and the NaN/Inf policy.

Storage units: the foreground is clipped to its [lo, hi] percentiles and mapped linearly to
1..255 (u = 1 + 254 (x - lo) / (hi - lo), rounded); background is 0. The clipped foreground's
mean and std are recorded in the same units, so BrainDINO's foreground z-score of the original
volume is (u - fg_mean) / fg_std, a linear transform applied when the slice is loaded.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class IntensityScale:
    """Clip range (source units) and the clipped foreground's moments in uint8 units."""

    lo: float
    hi: float
    fg_mean: float
    fg_std: float

    def to_uint8(self, data: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Map ``data`` to storage units: foreground → 1..255, background (``~mask``) → 0."""
        gain = np.float32(254.0 / (self.hi - self.lo))
        u = np.clip(data, np.float32(self.lo), np.float32(self.hi))
        u -= np.float32(self.lo)
        u *= gain
        u += np.float32(1.5)  # +0.5 so the truncating cast rounds to nearest
        out = u.astype(np.uint8)
        out[~mask] = 0
        return out


def zero_nonfinite(data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Set NaN/Inf voxels to 0; returns (data, finite mask or None if all finite, count)."""
    finite = np.isfinite(data)
    count = int(data.size - np.count_nonzero(finite))
    if count == 0:
        return data, None, 0
    return np.where(finite, data, np.float32(0)), finite, count


_OVERFLOW = "foreground intensities overflow float32 (is the header's scl_slope/scl_inter sane?)"

# Integer-valued data spanning fewer levels than this are counted instead of partitioned.
MAX_COUNTED_LEVELS = 1 << 22
_INTEGER_PROBE = 4096  # leading values checked first, so non-integer data fall back at once


def percentiles_inplace(values: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """np.percentile's default ("linear") estimate of 1D ``values``, without a copy.

    Integer-valued data (unresampled integer scans) are counted with a histogram, in O(n)
    and leaving ``values`` as they are; anything else is partitioned in place.
    """
    positions = [q / 100.0 * (values.size - 1) for q in qs]
    ranks = sorted({int(np.floor(p)) for p in positions} | {int(np.ceil(p)) for p in positions})
    stats = _counted_order_statistics(values, ranks)
    if stats is None:
        values.partition(ranks)
        stats = {r: float(values[r]) for r in ranks}
    out = []
    for p in positions:
        below, above = stats[int(np.floor(p))], stats[int(np.ceil(p))]
        out.append(below + (above - below) * (p - np.floor(p)))
    return tuple(out)


def _counted_order_statistics(values: np.ndarray, ranks: list[int]) -> dict[int, float] | None:
    """The values of the given ranks (0-based, ascending order) by counting each integer level;
    None unless every value is an integer and they span fewer than MAX_COUNTED_LEVELS levels."""
    probe = values[:_INTEGER_PROBE]
    if not np.array_equal(probe, np.floor(probe)):
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi - lo >= MAX_COUNTED_LEVELS or lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
        return None
    levels = values.astype(np.int32)
    if not np.array_equal(levels, values):
        return None
    levels -= np.int32(lo)
    cumulative = np.cumsum(np.bincount(levels))
    # The value of rank r is the first level whose cumulative count exceeds r.
    return {r: lo + float(np.searchsorted(cumulative, r, side="right")) for r in ranks}


def fit_intensity_scale(values: np.ndarray, clip_percentiles: tuple[float, float]) -> IntensityScale:
    """Percentiles and clipped moments of the foreground ``values`` (1D float32, finite).

    ``values`` is reordered in place (it is the caller's scratch copy). Raises ValueError when
    the clip range is empty (a constant foreground has no contrast), or when the intensities are
    too large for float32 moments (typically a garbage scl_slope in the header).
    """
    lo, hi = percentiles_inplace(values, clip_percentiles)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(_OVERFLOW + f" (clip range {lo:g}..{hi:g})")
    if not hi > lo:
        raise ValueError(
            f"foreground intensity is constant between the {clip_percentiles[0]} and "
            f"{clip_percentiles[1]} percentiles ({lo:g}); nothing to scale"
        )
    clipped = np.clip(values, np.float32(lo), np.float32(hi), out=values)
    mean = float(np.mean(clipped, dtype=np.float64))
    clipped -= np.float32(mean)
    with np.errstate(over="ignore"):  # an overflow is reported below, with its cause
        std = float(np.sqrt(np.mean(np.square(clipped), dtype=np.float64)))
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise ValueError(_OVERFLOW + f" (mean {mean:g}, std {std:g})")
    gain = 254.0 / (hi - lo)
    return IntensityScale(lo=lo, hi=hi, fg_mean=1.0 + gain * (mean - lo), fg_std=gain * std)
