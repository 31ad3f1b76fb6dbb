"""Resample a RAS+ volume onto a world-axis-aligned grid of a target spacing.

The output grid points sit on the world lattice ``spacing * integer`` (mm) and cover the input's
voxel centres. Anchoring to the world lattice, instead of to each file's origin, means two
acquisitions of the same head in the same scanner frame land on the same grid points whatever
their orientation, obliquity or field of view. An oblique input is rotated back to the world
axes here. Images use linear or cubic interpolation; label maps use nearest neighbour, so the
label set never gains values that were not there.

Two code paths give the same values (up to float32 rounding): an axis-aligned input (each output
axis maps to one input axis, possibly flipped: the common case) is interpolated separably, one
1-D pass per axis, which costs (order + 1) reads per output voxel and pass instead of
(order + 1)^3 gathers; an oblique one goes through ``scipy.ndimage.affine_transform``. Both
follow scipy's "constant" mode: B-spline interpolation, points outside the input's voxel
centres read 0, and spline coefficients are mirrored at the edges. (``oblique`` has the fast
linear path for oblique images and their masks; ``preprocess_volume`` picks it.)

Thick slices are not upsampled by more than a set factor: ``plan_grid`` then keeps the native
slices and resamples only within them (``native_slice_grid``), so no axial slice is invented.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

ORDERS = {"nearest": 0, "linear": 1, "cubic": 3}
# Below these tolerances an input counts as already on the target grid and is used as is.
SPACING_RTOL = 1e-3
OBLIQUE_TOL_DEG = 0.5

Box = tuple[slice, slice, slice]


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


def plane_distances(affine: np.ndarray) -> np.ndarray:
    """Distance (mm) between successive voxel planes across each voxel axis: the voxel volume
    over the area of the face spanned by the two other axes (the spacing when orthogonal)."""
    linear = affine[:3, :3]
    volume = abs(np.linalg.det(linear))
    return np.array([volume / np.linalg.norm(np.cross(linear[:, (d + 1) % 3], linear[:, (d + 2) % 3]))
                     for d in range(3)])


@dataclasses.dataclass(frozen=True)
class GridPlan:
    """Where a RAS+ volume is resampled to: the output grid and how it was chosen."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    mode: str  # "3d": the world lattice; "in-plane": native axial slices kept, resampled within;
    # "none": the input's own grid (already on target, or no target)
    slice_spacing: float  # mm between the input's axial slice planes
    slice_upsampling: float  # slice_spacing / the output's axial spacing (1.0 unless "3d")

    def describe(self) -> dict:
        """JSON-safe summary for a manifest row."""
        return {
            "mode": self.mode,
            "output_spacing_mm": [round(s, 6) for s in voxel_spacing(self.affine)],
            "input_slice_spacing_mm": round(self.slice_spacing, 6),
            "slice_upsampling": round(self.slice_upsampling, 4),
        }


class ThickSlicesError(ValueError):
    """Thick slices across a non-axial axis: no axial slice can be made without inventing data."""


def plan_grid(
    affine: np.ndarray,
    shape: tuple[int, int, int],
    target_spacing: tuple[float, float, float] | None,
    max_slice_upsampling: float | None = None,
) -> GridPlan:
    """The grid to resample a RAS+ volume onto (mode "none": it is already on target).

    The through-plane axis is the one whose plane distance needs the largest upsampling to
    reach the target (the axial axis on ties). Within ``max_slice_upsampling``, the grid is the
    world lattice (``target_grid``). Beyond it, if that axis is the axial one, the native slices
    are kept (``native_slice_grid``); if it is not (thick sagittal or coronal slices), every
    axial slice would be an interpolation, and ThickSlicesError says so.
    """
    distances = plane_distances(affine)
    unchanged = GridPlan(affine, tuple(int(n) for n in shape), "none", float(distances[2]), 1.0)
    if target_spacing is None:
        return unchanged
    factors = distances / np.asarray(target_spacing, float)
    thick = 2 if factors[2] >= factors.max() else int(np.argmax(factors))
    if max_slice_upsampling is None or factors[thick] <= max_slice_upsampling * (1 + SPACING_RTOL):
        if not needs_resampling(affine, target_spacing):
            return unchanged
        grid_affine, grid_shape = target_grid(affine, shape, target_spacing)
        return GridPlan(grid_affine, grid_shape, "3d", float(distances[2]),
                        float(distances[2] / target_spacing[2]))
    if thick != 2:
        raise ThickSlicesError(
            f"{'RAS'[thick]}-axis slices {distances[thick]:.2f} mm apart (thick {('sagittal', 'coronal')[thick]} "
            f"slices) would need {factors[thick]:.2f}x upsampling to make axial slices, above "
            f"max_slice_upsampling {max_slice_upsampling:g} (--max-slice-upsampling)"
        )
    grid_affine, grid_shape = native_slice_grid(affine, shape, target_spacing[:2])
    if is_axis_aligned(affine) and np.allclose(
        voxel_spacing(affine)[:2], target_spacing[:2], rtol=SPACING_RTOL, atol=0.0
    ):
        return unchanged  # already on the in-plane target: the native grid is the input's own
    return GridPlan(grid_affine, grid_shape, "in-plane", float(distances[2]), 1.0)


def native_slice_grid(
    affine: np.ndarray, shape: tuple[int, int, int], in_plane_spacing: tuple[float, float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A grid whose slices are the input's own axial slices, resampled within their plane.

    In-plane axes: world x projected onto the slice plane, and the plane normal cross that
    (≈ anterior); their points sit on a ``spacing * integer`` lattice of plane coordinates and
    cover the input voxel centres. The through-plane step is the input's, so output slice k is
    input slice k: nothing is interpolated across slices. For an axis-aligned input the in-plane
    lattice is the world lattice.
    """
    linear, origin = affine[:3, :3], affine[:3, 3]
    normal = np.cross(linear[:, 0], linear[:, 1])
    normal /= np.linalg.norm(normal)
    u = np.array([1.0, 0.0, 0.0]) - normal[0] * normal
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = linear @ corners + origin[:, None]
    spacing = np.asarray(in_plane_spacing, float)
    plane = np.stack([u @ world, v @ world]) / spacing[:, None]
    first = np.ceil(plane.min(axis=1) - 1e-6)
    last = np.floor(plane.max(axis=1) + 1e-6)
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2] = u * spacing[0], v * spacing[1], linear[:, 2]
    out[:3, 3] = origin - (u @ origin) * u - (v @ origin) * v + first[0] * spacing[0] * u + first[1] * spacing[1] * v
    return out, (int(last[0] - first[0] + 1), int(last[1] - first[1] + 1), int(shape[2]))


def box_mapping(
    affine: np.ndarray, grid_affine: np.ndarray, box: Box, native_slices: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(output-box index → input index, box affine) for ``box`` of a grid.

    With ``native_slices`` (a ``native_slice_grid``) the input axis that the output's axial
    axis steps along is set to exactly "input slice = ±output slice + integer", so float
    rounding can never move a point off its slice.
    """
    start = np.array([s.start for s in box], dtype=np.float64)
    box_affine = grid_affine.copy()
    box_affine[:3, 3] += grid_affine[:3, :3] @ start
    mapping = np.linalg.inv(affine) @ box_affine
    if native_slices:
        row = int(np.argmax(np.abs(mapping[:3, 2])))
        mapping[row] = [0.0, 0.0, float(np.sign(mapping[row, 2])), float(round(mapping[row, 3]))]
    return mapping, box_affine


def covering_box(
    affine: np.ndarray,
    grid: tuple[np.ndarray, tuple[int, int, int]],
    lo: tuple[int, int, int],
    hi: tuple[int, int, int],
    pad: tuple[int, int, int] = (0, 0, 0),
) -> Box:
    """Output-grid box (clipped) outside which linear or nearest resampling of a volume that is
    zero outside the input index box ``[lo, hi]`` (inclusive) reads exactly 0, widened by ``pad``.

    A linear sample is nonzero only within one input voxel of a nonzero voxel, so the box covers
    the output points whose input coordinates fall in ``[lo - 1, hi + 1]``.
    """
    out_affine, out_shape = grid
    corners = np.array(np.meshgrid(*[[a - 1, b + 1] for a, b in zip(lo, hi)], indexing="ij"), float)
    to_output = np.linalg.inv(out_affine) @ affine
    points = to_output[:3, :3] @ corners.reshape(3, -1) + to_output[:3, 3:4]
    first = np.floor(points.min(axis=1)).astype(int) - np.asarray(pad)
    last = np.ceil(points.max(axis=1)).astype(int) + np.asarray(pad)
    return tuple(
        slice(int(min(max(a, 0), n)), int(max(min(b + 1, n), 0)))
        for a, b, n in zip(first, last, out_shape)
    )


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    target_spacing: tuple[float, float, float],
    kind: str = "linear",
    grid: tuple[np.ndarray, tuple[int, int, int]] | None = None,
    box: Box | None = None,
    native_slices: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3D volume (any orientation) to ``target_spacing`` on the world lattice.

    ``kind`` is "linear" or "cubic" for images (float32 out), "nearest" for label maps (whose
    dtype is kept). Pass ``grid`` (from ``target_grid``) to put an image and its labels on the
    same grid; with the same affine and shape they get the same grid anyway. ``box`` (slices of
    that grid, e.g. from ``covering_box``) computes only that part: its values equal the same
    part of the whole. Points outside the input read 0. ``native_slices``: ``grid`` is a
    ``native_slice_grid`` (see ``box_mapping``). Returns the array and its affine.
    """
    if kind not in ORDERS:
        raise ValueError(f"kind: expected one of {tuple(ORDERS)}, got {kind!r}")
    if data.ndim != 3:
        raise ValueError(f"resample expects a 3D array, got shape {data.shape}")
    out_affine, out_shape = grid if grid is not None else target_grid(affine, data.shape, target_spacing)
    if box is None:
        box = tuple(slice(0, n) for n in out_shape)
    box_shape = tuple(s.stop - s.start for s in box)
    mapping, box_affine = box_mapping(affine, out_affine, box, native_slices)
    order = ORDERS[kind]
    if min(box_shape) <= 0:
        dtype = data.dtype if order == 0 else np.float32
        return np.zeros(tuple(max(n, 0) for n in box_shape), dtype), box_affine
    perm = _axis_permutation(mapping[:3, :3])
    if perm is not None:
        return _resample_separable(data, mapping, perm, box_shape, order), box_affine
    return _resample_affine(data, mapping, box_shape, order), box_affine


def is_separable(mapping: np.ndarray) -> bool:
    """Whether ``resample`` interpolates this mapping (output index → input index) separably:
    each output axis reads one input axis (flips and permutations allowed)."""
    return _axis_permutation(mapping[:3, :3]) is not None


def _axis_permutation(linear: np.ndarray) -> list[int] | None:
    """Input axis read by each output axis when ``linear`` has one nonzero per row and column
    (an axis-aligned mapping, flips allowed); None for an oblique one."""
    nonzero = np.abs(linear) > 1e-9 * np.abs(linear).max()
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    return [int(np.flatnonzero(column)[0]) for column in nonzero.T]


def _resample_affine(data: np.ndarray, mapping: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    if order == 0:
        return ndimage.affine_transform(data, linear, offset, output_shape=shape, order=0, mode="constant", cval=0)
    source = data if data.dtype in (np.float32, np.float64) else data.astype(np.float32)
    return ndimage.affine_transform(
        source, linear, offset, output_shape=shape, output=np.float32,
        order=order, mode="constant", cval=0.0, prefilter=order > 1,
    )


def _resample_separable(
    data: np.ndarray, mapping: np.ndarray, perm: list[int], shape: tuple[int, ...], order: int
) -> np.ndarray:
    """Axis-aligned resampling as successive 1-D interpolations along the input axes.

    Each input axis is first cut down to the taps the box reads, then the axes are processed in
    order of growing output/input size ratio, so the early passes run on the smallest arrays.
    """
    # float32 data stay float32; anything else (a 0/1 mask compared with 0.5 afterwards) is
    # interpolated in float64, as scipy does, so ties at 0.5 fall the same way.
    work = np.float32 if data.dtype == np.float32 else np.float64
    if order > 1:
        # Coefficients of the whole input: the spline prefilter is global along each line.
        coeffs = ndimage.spline_filter(data, order=order, output=work, mode="constant")
    else:
        coeffs = data
    taps, cut = [], []
    for out_axis, in_axis in enumerate(perm):
        scale, offset = mapping[in_axis, out_axis], mapping[in_axis, 3]
        coords = (np.arange(shape[out_axis]) + offset / scale) * scale  # as scipy's zoom_shift
        idx, weights = _axis_taps(coords, data.shape[in_axis], order)
        first, last = int(idx.min()), int(idx.max())
        cut.append(slice(first, last + 1))
        taps.append((in_axis, idx - first, weights))
    out = coeffs[tuple(cut[perm.index(a)] for a in range(3))]
    if order > 0:
        out = out.astype(work, copy=False)
    for in_axis, idx, weights in sorted(taps, key=lambda t: len(t[1]) / out.shape[t[0]]):
        if order <= 1 and np.array_equal(idx[:, 0], np.arange(len(idx))) and np.all(weights[:, 0] == 1):
            # Output voxels on input voxels (e.g. the native slices of a thick-slice scan): the
            # cut is the pass, less the unused last tap.
            out = out[(slice(None),) * in_axis + (slice(0, len(idx)),)]
            continue
        out = _interp_axis(out, in_axis, idx, weights)
    # Input axes → output axes.
    out = np.transpose(out, perm)
    return np.ascontiguousarray(out, dtype=np.float32 if order > 0 else out.dtype)


def _axis_taps(coords: np.ndarray, n: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights ([m, order + 1]) of 1-D B-spline interpolation at ``coords``.

    Points outside [0, n - 1] get zero weights; taps past an edge are mirrored (scipy's
    "constant" mode). For order 0 the weights are a bool "inside" column.
    """
    inside = (coords >= 0) & (coords <= n - 1)
    if order == 0:
        idx = np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.intp)[:, None]
        return idx, inside[:, None]
    base = np.floor(coords) - (order // 2)
    idx = base[:, None] + np.arange(order + 1)
    weights = _bspline(coords[:, None] - idx, order)
    weights[~inside] = 0.0
    idx = idx.astype(np.intp)
    if n == 1:
        idx[:] = 0
    else:  # mirror about the edge voxel centres: -1 → 1, n → n - 2
        period = 2 * (n - 1)
        idx = np.abs(idx) % period
        idx = np.where(idx > n - 1, period - idx, idx)
    # Points outside read index 0 with weight 0; keep their taps in range of the rest.
    idx[~inside] = idx[inside].min() if inside.any() else 0
    return idx, weights


def _bspline(x: np.ndarray, order: int) -> np.ndarray:
    """Centred B-spline of degree 1 or 3 at ``x``."""
    a = np.abs(x)
    if order == 1:
        return np.maximum(1.0 - a, 0.0)
    if order == 3:
        return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    raise ValueError(f"separable resampling supports orders 0, 1 and 3, got {order}")


def _interp_axis(src: np.ndarray, axis: int, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum of ``src`` gathered at ``idx[:, k]`` along ``axis``."""
    bcast = [1, 1, 1]
    bcast[axis] = -1
    if weights.dtype == bool:  # nearest: a gather, background where the point is outside
        out = np.take(src, idx[:, 0], axis=axis)
        if not weights.all():
            out[(slice(None),) * axis + (~weights[:, 0],)] = 0
        return out
    weights = weights.astype(src.dtype)
    out = np.take(src, idx[:, 0], axis=axis)
    out *= weights[:, 0].reshape(bcast)
    for k in range(1, idx.shape[1]):
        term = np.take(src, idx[:, k], axis=axis)
        term *= weights[:, k].reshape(bcast)
        out += term
    return out
