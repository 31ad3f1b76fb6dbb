"""preprocess_volume: one NIfTI/Analyze file → uint8 axial slices plus the metadata records need.

The order of steps matters for cost: the foreground mask is found on the source grid, in the
file's own memory layout (numpy passes over the flipped views that reorientation makes are
several times slower) and, for integer data with a "nonzero" mask, on the stored integers. The
volume is resampled only when its spacing or obliquity requires it, and then only over the
output box that can hold foreground (an oblique one, linearly, only in the blocks of that box
near the foreground: ``oblique``). Thick slices are never upsampled past
``max_slice_upsampling``: the native slices are kept and resampled in-plane instead. Without
resampling, only the foreground box (a brain fills a fifth of a typical field of view) is
converted to float32. Intensity statistics are taken once over the foreground, and only the kept
slices inside the crop box are scaled to uint8.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError, VolumeSkipped
from braindino_jax.preprocessing.foreground import foreground_mask
from braindino_jax.preprocessing.inplane import bounding_box, pad_to_square, shrink_to_fit
from braindino_jax.preprocessing.intensity import IntensityScale, fit_intensity_scale, zero_nonfinite
from braindino_jax.preprocessing.loading import LoadedVolume, load_volume
from braindino_jax.preprocessing.oblique import resample_near_foreground
from braindino_jax.preprocessing.orientation import axis_codes, reduce_unreversed, to_canonical
from braindino_jax.preprocessing.resampling import (
    GridPlan,
    ThickSlicesError,
    box_mapping,
    covering_box,
    is_separable,
    plan_grid,
    resample,
    voxel_spacing,
)
from braindino_jax.preprocessing.slices import foreground_fractions, select_slices


@dataclasses.dataclass
class PreparedVolume:
    """The kept axial slices of one 3D volume, with what a record or a probe needs to know."""

    slices: np.ndarray  # uint8 [N, size, size]; 0 = background
    slice_indices: np.ndarray  # int32 [N]: index along the canonical (RAS+) axial axis
    n_slices: int  # number of axial slices in the canonical (resampled) volume
    spacing: tuple[float, float, float]  # mm, canonical volume after resampling
    fg_mean: float  # clipped foreground mean, uint8 storage units
    fg_std: float  # clipped foreground std, uint8 storage units
    source_shape: tuple[int, ...]
    source_spacing: tuple[float, ...]
    orientation: str  # original axis codes, e.g. "LPS"
    nan_count: int  # NaN/Inf voxels found (treated as background)
    slices_dropped: int  # axial slices not kept
    volume_index: int  # index within a 4D series (0 for 3D)
    resampling: dict[str, Any]  # GridPlan.describe: what was done to reach the output grid


def preprocess_volume(path: str | os.PathLike, config: PrepConfig) -> list[PreparedVolume]:
    """Load, canonicalise, resample, mask, scale and slice ``path``: one result per 3D volume.

    Raises VolumeError (naming the file) for unreadable, corrupt or truncated files, images that
    are not 3D/4D, and volumes with no usable foreground (all zero, all NaN, constant, or no
    slice above the fraction threshold), including any one volume of a 4D series (see
    preprocess_series for the lenient form); its subclass VolumeSkipped for inputs the config
    leaves out: a 4D image under ``four_d_policy="skip"``, a foreground narrower in-plane than
    ``min_extent_mm``, and thick non-axial slices beyond ``max_slice_upsampling``.
    """
    prepared, failures = preprocess_series(path, config)
    if failures:
        raise failures[0][1]
    return prepared


def preprocess_series(
    path: str | os.PathLike, config: PrepConfig
) -> tuple[list[PreparedVolume], list[tuple[int, VolumeError]]]:
    """preprocess_volume for batch jobs: under ``four_d_policy="all"`` a volume of the series
    that fails comes back as ``(volume_index, error)`` beside the good ones, so one blank
    volume of a DWI or fMRI series does not lose the rest. Raises when no volume is usable.
    """
    config.validate()
    loaded = load_volume(path)
    if loaded.stored.ndim == 4:
        n_volumes = loaded.stored.shape[3]
        if config.four_d_policy == "skip":
            raise VolumeSkipped(path, f"4D image with {n_volumes} volumes and four_d_policy='skip'")
        indices = range(n_volumes) if config.four_d_policy == "all" else range(1)
        volumes = [(t, loaded.stored[..., t]) for t in indices]
    else:
        volumes = [(0, loaded.stored)]
    orientation = axis_codes(loaded.affine)
    prepared, failures = [], []
    for t, vol in volumes:
        try:
            prepared.append(_prepare_3d(path, loaded, vol, t, orientation, config))
        except VolumeError as exc:
            failures.append((t, exc))
    if not prepared:
        raise failures[0][1]
    return prepared, failures


def _prepare_3d(
    path: str | os.PathLike,
    loaded: LoadedVolume,
    stored: np.ndarray,
    volume_index: int,
    orientation: str,
    config: PrepConfig,
) -> PreparedVolume:
    where = f" (volume {volume_index} of the 4D series)" if loaded.stored.ndim == 4 else ""
    zero = loaded.stored_zero() if config.mask_method == "nonzero" else None
    nan_count = 0
    unscaled = zero is not None  # ``data`` holds the stored integers until the box is known
    if unscaled:
        # Exactly the voxels whose float32 value is nonzero, found without converting any.
        mask, data = stored != zero, stored
        if not mask.any():
            raise VolumeError(path, f"all voxels are zero{where}")
    else:
        data, finite = loaded.to_float32(stored), None
        if loaded.may_be_nonfinite:
            data, finite, nan_count = zero_nonfinite(data)
            if nan_count == data.size:
                raise VolumeError(path, f"all {data.size} voxels are NaN or Inf{where}")
        mask = foreground_mask(data, config.mask_method, config.mask_percentile, finite)
        if not mask.any():
            if not data.any():
                raise VolumeError(path, f"all voxels are zero{where}")
            raise VolumeError(path, f"no foreground voxels with mask_method={config.mask_method!r}{where}")
    file_mask = mask  # in the file's layout, which resampling reads fastest
    mask, affine = to_canonical(file_mask, loaded.affine)

    full_shape, origin = mask.shape, (0, 0, 0)
    try:
        plan = plan_grid(affine, mask.shape, config.target_spacing, config.max_slice_upsampling)
    except ThickSlicesError as exc:
        raise VolumeSkipped(path, f"{exc}{where}") from exc
    if plan.mode != "none":
        data, mask, box = _resample(loaded, data, unscaled, file_mask, plan, config)
        unscaled = False
        affine, full_shape, origin = plan.affine, plan.shape, tuple(s.start for s in box)
        if not mask.any():
            raise VolumeError(path, f"foreground vanished when resampling to {config.target_spacing} mm{where}")
    else:
        data = to_canonical(data, loaded.affine)[0]

    plane_box = bounding_box(reduce_unreversed(np.any, mask, axis=2), margin=0)
    spacing = voxel_spacing(affine)
    extent = ((plane_box[1] - plane_box[0]) * spacing[0], (plane_box[3] - plane_box[2]) * spacing[1])
    if min(extent) < config.min_extent_mm:
        raise VolumeSkipped(
            path,
            f"foreground spans only {extent[0]:.0f} x {extent[1]:.0f} mm in-plane, below min_extent_mm "
            f"{config.min_extent_mm:g} (--min-extent-mm): too small a field of view to be a brain{where}",
        )

    # Fractions are of the whole axial plane of the (resampled) grid, indexed along its axis.
    fractions = np.zeros(full_shape[2])
    fractions[origin[2] : origin[2] + mask.shape[2]] = foreground_fractions(mask, full_shape[0] * full_shape[1])
    kept = select_slices(fractions, config.min_foreground_fraction, config.n_slices)
    if kept.size == 0:
        raise VolumeError(
            path,
            f"no axial slice has a foreground fraction >= {config.min_foreground_fraction} "
            f"(largest is {fractions.max():.4f}){where}",
        )
    # Everything below reads only the foreground box (plus the in-plane margin): a brain fills
    # a fraction of the field of view, and boolean gathers over the full volume dominate cost.
    box = _foreground_box(mask.shape, plane_box, np.flatnonzero(fractions) - origin[2], config.margin)
    data, mask = data[box], mask[box]
    if unscaled:
        data = loaded.to_float32(data)
    try:
        scale = fit_intensity_scale(_foreground_values(data, mask), config.clip_percentiles)
    except ValueError as exc:
        raise VolumeError(path, f"{exc}{where}") from exc

    n_axial = full_shape[2]
    return PreparedVolume(
        slices=_frame_slices(data, mask, kept - origin[2] - box[2].start, scale, config),
        slice_indices=kept,
        n_slices=n_axial,
        spacing=spacing,
        fg_mean=scale.fg_mean,
        fg_std=scale.fg_std,
        source_shape=tuple(int(n) for n in loaded.stored.shape),
        source_spacing=loaded.spacing,
        orientation=orientation,
        nan_count=nan_count,
        slices_dropped=n_axial - int(np.unique(kept).size),
        volume_index=volume_index,
        resampling=plan.describe(),
    )


def _resample(
    loaded: LoadedVolume,
    data: np.ndarray,
    unscaled: bool,
    mask: np.ndarray,
    plan: GridPlan,
    config: PrepConfig,
) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice, slice]]:
    """Image (float32) and mask on the part of ``plan``'s grid that can hold foreground.

    ``data`` (stored integers when ``unscaled``) and ``mask`` are in the file's layout; they are
    read with their axes in memory order (a NIfTI array is Fortran-ordered), which makes every
    copy and reduction over them several times faster than through the canonical view. Only the
    output box that can hold foreground is computed (plus the in-plane margin the framing
    reads); outside it the resampled mask is exactly 0. Returns the two arrays and the box.
    """
    axes = sorted(range(3), key=lambda a: -data.strides[a])
    data, mask = data.transpose(axes), mask.transpose(axes)
    affine = loaded.affine[:, axes + [3]]
    grid = (plan.affine, plan.shape)
    lo, hi = _index_extent(mask)
    box = covering_box(affine, grid, lo, hi, pad=(config.margin, config.margin, 0))
    native = plan.mode == "in-plane"
    mapping, _ = box_mapping(affine, plan.affine, box, native)
    if config.interpolation == "linear" and not is_separable(mapping):
        convert = loaded.to_float32 if unscaled else np.asarray
        shape = tuple(s.stop - s.start for s in box)
        data, mask, part = resample_near_foreground(
            data, mask, lo, hi, mapping, shape, convert, zero_background=config.mask_method == "nonzero",
            pad=(config.margin, config.margin, 0),
        )
        return data, mask, tuple(slice(b.start + p.start, b.start + p.stop) for b, p in zip(box, part))
    if unscaled:
        data = loaded.to_float32(data)
    spacing = config.target_spacing
    data, _ = resample(data, affine, spacing, config.interpolation, grid, box, native)
    mask_f, _ = resample(mask.view(np.uint8), affine, spacing, "linear", grid, box, native)
    return data, mask_f >= 0.5, box


def _foreground_values(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``data[mask]`` (a fresh 1D array, in C order of the canonical axes), gathered fast.

    The order is part of the result: the intensity moments are float sums over this array.
    Through the flipped, transposed views that reorientation leaves, a boolean gather reads
    one cache line per voxel; copying both arrays to C order first is cheaper (the mask via a
    compact copy in memory order: a transposing copy out of a sparse view is slower still).
    """
    return np.ascontiguousarray(data)[np.ascontiguousarray(mask.copy(order="K"))]


def _index_extent(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """First and last index (inclusive) of the foreground along each axis of a 3D mask."""
    x0, x1, y0, y1 = bounding_box(reduce_unreversed(np.any, mask, axis=2), margin=0)
    zs = np.flatnonzero(reduce_unreversed(np.any, mask, axis=(0, 1)))
    return (x0, y0, int(zs[0])), (x1 - 1, y1 - 1, int(zs[-1]))


def _foreground_box(
    shape: tuple[int, ...], plane_box: tuple[int, int, int, int], zs: np.ndarray, margin: int
) -> tuple[slice, slice, slice]:
    """Index box of all foreground voxels (``plane_box``: their tight in-plane box; ``zs``: the
    axial indices holding some), widened in-plane by ``margin`` (clipped)."""
    x0, x1, y0, y1 = plane_box
    return (slice(max(x0 - margin, 0), min(x1 + margin, shape[0])),
            slice(max(y0 - margin, 0), min(y1 + margin, shape[1])),
            slice(int(zs[0]), int(zs[-1]) + 1))


def _frame_slices(
    data: np.ndarray, mask: np.ndarray, kept: np.ndarray, scale: IntensityScale, config: PrepConfig
) -> np.ndarray:
    """Kept slices (indices into ``data``'s last axis) in display orientation, as uint8 squares.

    Display orientation is ``canonical[:, ::-1, k].T``: rows run anterior → posterior, columns
    patient left → right. The box is the union over the kept slab, so every slice of a volume
    shares one in-plane frame.
    """
    slab = slice(int(kept.min()), int(kept.max()) + 1)
    box = bounding_box(reduce_unreversed(np.any, mask[:, ::-1, slab], axis=2).T, config.margin)
    r0, r1, c0, c1 = box  # not None: the kept slices hold foreground
    n_y = data.shape[1]
    ys = slice(n_y - r1, n_y - r0)
    image = np.transpose(data[c0:c1, ys][:, :, kept][:, ::-1], (2, 1, 0))
    inside = np.transpose(mask[c0:c1, ys][:, :, kept][:, ::-1], (2, 1, 0))
    if max(image.shape[1:]) > config.size:
        image = shrink_to_fit(np.ascontiguousarray(image, dtype=np.float32), config.size)
        inside = shrink_to_fit(inside.astype(np.float32), config.size) >= 0.5
    return pad_to_square(scale.to_uint8(image, inside), config.size)
