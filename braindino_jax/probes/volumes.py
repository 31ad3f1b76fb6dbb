"""What a probe reads from one NIfTI file: the data-prep library's slices, and aligned label maps.

Images go through ``preprocess_volume``, exactly as pretraining data do. A segmentation label
map on the image's voxel grid is taken through the same geometry: RAS+ reorientation,
resampling to the target spacing (nearest neighbour), the kept axial slices, the framing box
of the image's foreground and the shrink-and-pad to the output square. Each result is checked
against ``preprocess_volume``'s own output (the framed image foreground must equal its nonzero
pixels), so a change in the data-prep geometry cannot silently misalign the labels.

Only numpy and preprocessing are imported: these functions run in worker processes.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError
from braindino_jax.preprocessing.foreground import foreground_mask
from braindino_jax.preprocessing.inplane import bounding_box, pad_to_square, shrink_to_fit
from braindino_jax.preprocessing.intensity import zero_nonfinite
from braindino_jax.preprocessing.loading import LoadedVolume, load_volume
from braindino_jax.preprocessing.orientation import to_canonical
from braindino_jax.preprocessing.resampling import needs_resampling, resample, target_grid
from braindino_jax.preprocessing.volume import PreparedVolume, preprocess_volume

_AFFINE_TOL_MM = 1e-3


@dataclasses.dataclass
class ProbeVolume:
    """One 3D volume as the encoder will see it (before the on-device z-score)."""

    pixels: np.ndarray  # uint8 [N, size, size]; 0 = background, foreground 1..255
    fg_mean: float  # foreground mean and std in uint8 units: z = (u - fg_mean) / fg_std
    fg_std: float
    slice_indices: np.ndarray  # int32 [N], canonical (RAS+) axial indices
    labels: np.ndarray | None = None  # label-map values [N, size, size], framed like pixels


def read_probe_volume(
    path: str | os.PathLike, config: PrepConfig, mask_path: str | os.PathLike | None = None
) -> ProbeVolume:
    """Preprocess ``path`` (a 4D series: its first volume) and, if given, frame its label map.

    Raises VolumeError naming the image or the label file.
    """
    # One volume per file: a 4D series gives its first volume unless the policy skips 4D files.
    policy = "first" if config.four_d_policy == "all" else config.four_d_policy
    prepared = preprocess_volume(path, dataclasses.replace(config, four_d_policy=policy))[0]
    labels = None if mask_path is None else frame_labels(path, mask_path, prepared, config)
    return ProbeVolume(
        pixels=prepared.slices,
        fg_mean=float(prepared.fg_mean),
        fg_std=float(prepared.fg_std),
        slice_indices=prepared.slice_indices,
        labels=labels,
    )


def read_timed(
    path: str, config: PrepConfig, mask_path: str | None = None
) -> tuple[ProbeVolume | VolumeError, float]:
    """read_probe_volume for a worker pool: a bad volume comes back as its error, with the
    seconds spent, so the batch goes on and the caller records why."""
    start = time.perf_counter()
    try:
        result: ProbeVolume | VolumeError = read_probe_volume(path, config, mask_path)
    except VolumeError as err:
        result = err
    return result, time.perf_counter() - start


def _first_volume(loaded: LoadedVolume) -> np.ndarray:
    return loaded.stored if loaded.stored.ndim == 3 else loaded.stored[..., 0]


def _image_mask(loaded: LoadedVolume, config: PrepConfig) -> np.ndarray:
    """The image's foreground mask on its own grid, as preprocess_volume finds it."""
    stored = _first_volume(loaded)
    zero = loaded.stored_zero() if config.mask_method == "nonzero" else None
    if zero is not None:
        return stored != zero
    data, finite = loaded.to_float32(stored), None
    if loaded.may_be_nonfinite:
        data, finite, _ = zero_nonfinite(data)
    return foreground_mask(data, config.mask_method, config.mask_percentile, finite)


def _label_values(loaded: LoadedVolume, mask_path: str | os.PathLike) -> np.ndarray:
    """Integer label values of a label map (any stored type, scaling applied)."""
    stored = _first_volume(loaded)
    if loaded.slope == 1.0 and loaded.inter == 0.0 and stored.dtype.kind in "iub":
        values = np.asarray(stored)
    else:
        values = loaded.to_float32(stored)
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise VolumeError(mask_path, "label map holds non-integer or non-finite values")
    if values.min() < 0 or values.max() > np.iinfo(np.int32).max:
        raise VolumeError(mask_path, f"label values must be >= 0, found {values.min()}..{values.max()}")
    return values.astype(np.int32)


def frame_labels(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    prepared: PreparedVolume,
    config: PrepConfig,
) -> np.ndarray:
    """Label-map values [N, size, size] (int32) aligned pixel for pixel with ``prepared.slices``."""
    image = load_volume(image_path)
    label_volume = load_volume(mask_path)
    labels = _label_values(label_volume, mask_path)
    mask = _image_mask(image, config)
    if labels.shape != mask.shape or not np.allclose(label_volume.affine, image.affine, atol=_AFFINE_TOL_MM):
        raise VolumeError(
            mask_path,
            f"label map grid (shape {labels.shape}) does not match the image {os.fspath(image_path)} "
            f"(shape {mask.shape}); segmentation needs masks on the image's voxel grid",
        )
    mask, affine = to_canonical(mask, image.affine)
    labels, _ = to_canonical(labels, image.affine)
    if needs_resampling(affine, config.target_spacing):
        grid = target_grid(affine, mask.shape, config.target_spacing)
        mask = resample(mask.view(np.uint8), affine, config.target_spacing, "linear", grid)[0] >= 0.5
        labels = resample(labels, affine, config.target_spacing, "nearest", grid)[0]
    kept = prepared.slice_indices
    slab = slice(int(kept.min()), int(kept.max()) + 1)
    # Display orientation canonical[:, ::-1, k].T, framed by the foreground box over the slab.
    r0, r1, c0, c1 = bounding_box(mask[:, ::-1, slab].any(axis=2).T, config.margin)
    inside = np.transpose(mask[:, ::-1][:, :, kept], (2, 1, 0))[:, r0:r1, c0:c1]
    framed = np.transpose(labels[:, ::-1][:, :, kept], (2, 1, 0))[:, r0:r1, c0:c1]
    if max(framed.shape[1:]) > config.size:
        inside = shrink_to_fit(inside.astype(np.float32), config.size) >= 0.5
        framed = _shrink_labels(framed, config.size)
    inside, framed = pad_to_square(inside, config.size), pad_to_square(framed, config.size)
    mismatched = int(np.count_nonzero(inside != (prepared.slices > 0)))
    if mismatched:
        raise VolumeError(
            mask_path,
            f"label framing disagrees with preprocess_volume's slices of {os.fspath(image_path)} on "
            f"{mismatched} pixels (the data-prep geometry changed; update probes/volumes.py)",
        )
    return framed


def _shrink_labels(framed: np.ndarray, size: int) -> np.ndarray:
    """Shrink a label stack like the image (same sample points): the class of largest weight."""
    values = np.unique(framed)
    weights = np.stack([shrink_to_fit((framed == v).astype(np.float32), size) for v in values])
    return values[np.argmax(weights, axis=0)].astype(np.int32)
