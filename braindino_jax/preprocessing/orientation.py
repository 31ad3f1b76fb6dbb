"""Reorient a volume to RAS+ (nibabel's closest canonical) without copying voxels.

After this the voxel axes increase toward patient Right, Anterior and Superior, so the last
axis is the axial one and the in-plane orientation of a slice is the same for every input.
An oblique acquisition keeps its residual rotation here; resampling removes it.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations


def axis_codes(affine: np.ndarray) -> str:
    """Closest axis codes of an affine, e.g. "LPS" (the direction each voxel axis increases)."""
    return "".join(orientations.aff2axcodes(affine))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose the first three axes of ``data`` to RAS+; returns a view and its affine.

    Extra trailing axes (e.g. time) are carried along unchanged.
    """
    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = orientations.apply_orientation(data, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape[:3])
    return out, new_affine


def reduce_unreversed(func, data: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """``func(data, axis=axis)`` (e.g. np.any, np.sum), computed over ``data`` with its
    reversed axes put back in memory order and the result reversed to match.

    ``to_canonical`` returns views with negative strides, and numpy's reductions over those run
    several times slower than over the same memory read forwards.
    """
    axes = {axis} if isinstance(axis, int) else set(axis)
    reversed_axes = tuple(i for i, step in enumerate(data.strides) if step < 0)
    out = func(np.flip(data, reversed_axes), axis=axis)
    kept = [i for i in range(data.ndim) if i not in axes]
    return np.flip(out, tuple(j for j, i in enumerate(kept) if i in reversed_axes))
