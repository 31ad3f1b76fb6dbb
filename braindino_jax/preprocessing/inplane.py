"""In-plane framing: crop axial slices to the foreground box plus a margin, then fit a square.

Slices are in display orientation (rows anterior → posterior, columns patient left → right).
A box that fits the square is padded, never enlarged, so a pixel keeps its physical size (1 mm
at the default spacing); a larger box is shrunk uniformly, so anatomy is never stretched.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def bounding_box(mask_2d: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1), half-open, of the True pixels plus ``margin``, clipped to the
    image; None when the mask is empty."""
    rows = np.flatnonzero(mask_2d.any(axis=1))
    cols = np.flatnonzero(mask_2d.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask_2d.shape
    return (
        max(int(rows[0]) - margin, 0),
        min(int(rows[-1]) + 1 + margin, h),
        max(int(cols[0]) - margin, 0),
        min(int(cols[-1]) + 1 + margin, w),
    )


def shrink_to_fit(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize a float stack [N, h, w] uniformly so its longer side is ``size`` (linear).

    The box of each output pixel maps onto the input (pixel centres at +0.5), and a Gaussian
    pre-filter of sigma (1/f - 1)/2 limits aliasing when shrinking by the factor f.
    """
    _, h, w = stack.shape
    factor = size / max(h, w)
    out_h, out_w = max(1, round(h * factor)), max(1, round(w * factor))
    sigma = (1.0 / factor - 1.0) / 2.0
    if sigma > 0:
        stack = ndimage.gaussian_filter(stack, sigma=(0.0, sigma, sigma), mode="constant")
    scale = np.array([1.0, h / out_h, w / out_w])
    offset = 0.5 * scale - 0.5
    offset[0] = 0.0
    return ndimage.affine_transform(
        stack, scale, offset, output_shape=(stack.shape[0], out_h, out_w),
        output=np.float32, order=1, mode="nearest",
    )


def pad_to_square(stack: np.ndarray, size: int) -> np.ndarray:
    """Centre a stack [N, h, w] with h, w <= size in a zero-filled [N, size, size] array."""
    n, h, w = stack.shape
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} into {size}x{size}; shrink it first")
    out = np.zeros((n, size, size), dtype=stack.dtype)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = stack
    return out
