"""Resample a RAS+ volume onto a world-axis-aligned grid of a target spacing (scipy.ndimage).

The output grid points sit on the world lattice ``spacing * integer`` (mm) and cover the input's
voxel centres. Anchoring to the world lattice, instead of to each file's origin, means two
acquisitions of the same head in the same scanner frame land on the same grid points whatever
their orientation, obliquity or field of view. An oblique input is rotated back to the world
axes here. Images use linear or cubic interpolation; label maps use nearest neighbour, so the
label set never gains values that were not there.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ORDERS = {"nearest": 0, "linear": 1, "cubic": 3}
# Below these tolerances an input counts as already on the target grid and is used as is.
SPACING_RTOL = 1e-3
OBLIQUE_TOL_DEG = 0.5


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Length (mm) of each voxel axis: the column norms of the affine's linear part."""
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def is_axis_aligned(affine: np.ndarray, tol_deg: float = OBLIQUE_TOL_DEG) -> bool:
    """True when every voxel axis is within ``tol_deg`` of the world axis it mostly follows."""
    linear = affine[:3, :3]
    cosines = np.abs(linear) / np.linalg.norm(linear, axis=0)
    return bool(np.all(cosines.max(axis=0) >= np.cos(np.deg2rad(tol_deg))))


def needs_resampling(affine: np.ndarray, target_spacing: tuple[float, float, float] | None) -> bool:
    """Whether a RAS+ volume must be resampled to reach ``target_spacing`` on world axes."""
    if target_spacing is None:
        return False
    if not is_axis_aligned(affine):
        return True
    return not np.allclose(voxel_spacing(affine), target_spacing, rtol=SPACING_RTOL, atol=0.0)


def target_grid(
    affine: np.ndarray, shape: tuple[int, int, int], target_spacing: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the world-lattice grid covering the input voxel centres."""
    spacing = np.asarray(target_spacing, dtype=np.float64)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    # The small slack keeps lattice points that float error puts a hair outside the box.
    first = np.ceil(world.min(axis=1) / spacing - 1e-6)
    last = np.floor(world.max(axis=1) / spacing + 1e-6)
    out_shape = tuple(int(n) for n in (last - first + 1).astype(int))
    out_affine = np.eye(4)
    out_affine[:3, :3] = np.diag(spacing)
    out_affine[:3, 3] = first * spacing
    return out_affine, out_shape


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    target_spacing: tuple[float, float, float],
    kind: str = "linear",
    grid: tuple[np.ndarray, tuple[int, int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3D volume (any orientation) to ``target_spacing`` on the world lattice.

    ``kind`` is "linear" or "cubic" for images, "nearest" for label maps (whose dtype is kept).
    Pass ``grid`` (from ``target_grid``) to put an image and its labels on the same grid; with
    the same affine and shape they get the same grid anyway. Points outside the input read 0.
    Returns the resampled array and its affine.
    """
    if kind not in ORDERS:
        raise ValueError(f"kind: expected one of {tuple(ORDERS)}, got {kind!r}")
    if data.ndim != 3:
        raise ValueError(f"resample expects a 3D array, got shape {data.shape}")
    out_affine, out_shape = grid if grid is not None else target_grid(affine, data.shape, target_spacing)
    # Output index → input index: inv(A_in) @ A_out.
    mapping = np.linalg.inv(affine) @ out_affine
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    if np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9):
        linear = np.diag(linear)  # separable fast path in scipy
    order = ORDERS[kind]
    if order == 0:
        out = ndimage.affine_transform(
            data, linear, offset, output_shape=out_shape, order=0, mode="constant", cval=0
        )
    else:
        source = data if data.dtype in (np.float32, np.float64) else data.astype(np.float32)
        out = ndimage.affine_transform(
            source, linear, offset, output_shape=out_shape, output=np.float32,
            order=order, mode="constant", cval=0.0, prefilter=order > 1,
        )
    return out, out_affine
