"""The preprocessing configuration shared by data preparation and the probes.

One frozen dataclass, so the exact settings used for a corpus can be written into its dataset
card and re-applied verbatim when a probe preprocesses evaluation volumes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from braindino_jax.preprocessing.errors import ConfigError

INTERPOLATIONS = ("linear", "cubic")
FOUR_D_POLICIES = ("first", "all", "skip")
MASK_METHODS = ("nonzero", "otsu", "percentile")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """How a volume becomes uint8 axial slices (see the field comments for units)."""

    target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)  # mm; None = no resampling
    interpolation: str = "linear"  # "linear" | "cubic" for images; label maps always nearest
    four_d_policy: str = "first"  # "first" | "all" | "skip"
    mask_method: str = "nonzero"  # "nonzero" (skull-stripped) | "otsu" | "percentile"
    mask_percentile: float = 10.0  # used by mask_method="percentile"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    min_foreground_fraction: float = 0.05  # slice kept when its foreground fraction >= this
    n_slices: int | None = None  # keep N slices spaced uniformly between first and last fg slice
    size: int = 256  # output in-plane square size
    margin: int = 8  # pixels of margin around the foreground bounding box
    # Thick slices: at most this factor of through-plane upsampling (slice distance / target
    # z spacing); beyond it only the in-plane axes are resampled and the native slices kept.
    max_slice_upsampling: float | None = 2.0  # None = no limit
    min_extent_mm: float = 60.0  # smallest in-plane foreground extent accepted (a brain's is > 100)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        ts = self.target_spacing
        if ts is not None and (
            not isinstance(ts, (tuple, list)) or len(ts) != 3 or not all(_is_number(s) and s > 0 for s in ts)
        ):
            self._fail("target_spacing", f"expected None or three positive finite mm values, got {ts!r}")
        for name, choices in (("interpolation", INTERPOLATIONS), ("four_d_policy", FOUR_D_POLICIES),
                              ("mask_method", MASK_METHODS)):
            if getattr(self, name) not in choices:
                self._fail(name, f"expected one of {choices}, got {getattr(self, name)!r}")
        if not (_is_number(self.mask_percentile) and 0.0 <= self.mask_percentile < 100.0):
            self._fail("mask_percentile", f"expected a number in [0, 100), got {self.mask_percentile!r}")
        cp = self.clip_percentiles
        if (
            not isinstance(cp, (tuple, list))
            or len(cp) != 2
            or not all(_is_number(p) for p in cp)
            or not 0.0 <= cp[0] < cp[1] <= 100.0
        ):
            self._fail("clip_percentiles", f"expected (lo, hi) with 0 <= lo < hi <= 100, got {cp!r}")
        f = self.min_foreground_fraction
        if not (_is_number(f) and 0.0 <= f <= 1.0):
            self._fail("min_foreground_fraction", f"expected a number in [0, 1], got {f!r}")
        if self.n_slices is not None and not (_is_int(self.n_slices) and self.n_slices >= 1):
            self._fail("n_slices", f"expected None or an integer >= 1, got {self.n_slices!r}")
        if not (_is_int(self.size) and self.size >= 8):
            self._fail("size", f"expected an integer >= 8, got {self.size!r}")
        if not (_is_int(self.margin) and 0 <= self.margin < self.size // 2):
            self._fail("margin", f"expected an integer in [0, {self.size // 2}) (below half the output "
                       f"size {self.size}), got {self.margin!r}")
        up = self.max_slice_upsampling
        if up is not None and not (_is_number(up) and up >= 1.0):
            self._fail("max_slice_upsampling", f"expected None or a number >= 1, got {up!r}")
        if not (_is_number(self.min_extent_mm) and self.min_extent_mm >= 0.0):
            self._fail("min_extent_mm", f"expected a number of mm >= 0, got {self.min_extent_mm!r}")

    @staticmethod
    def _fail(name: str, problem: str) -> None:
        raise ConfigError(f"PrepConfig.{name}", problem)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); ``from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [float(v) for v in value]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepConfig:
        """Build and validate a config; unknown keys are an error (they are usually typos)."""
        if not isinstance(data, dict):
            raise ConfigError("PrepConfig", f"expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"PrepConfig.{unknown[0]}", f"unknown field (known: {sorted(known)})")
        kwargs = dict(data)
        for key in ("target_spacing", "clip_percentiles"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        config = cls(**kwargs)
        config.validate()
        return config
