"""Read a NIfTI-1/2 or Analyze volume into float32 with scaling applied, or fail with VolumeError.

nibabel parses headers lazily; a truncated or corrupt data block only shows up when the voxels
are read. Reading them here, inside one try block, turns every such failure into a VolumeError
that names the file, so a batch job can record it and go on.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from braindino_jax.preprocessing.errors import VolumeError

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


@dataclasses.dataclass
class LoadedVolume:
    """Voxels (float32, 3D or 4D, scaling applied) with the geometry needed downstream."""

    data: np.ndarray
    affine: np.ndarray  # voxel → world (RAS mm), 4x4 float64
    spacing: tuple[float, ...]  # header zooms of the spatial (and time) axes
    disk_dtype: np.dtype  # dtype stored in the file, before scaling
    may_be_nonfinite: bool  # False when the on-disk dtype and scaling cannot produce NaN/Inf


def _check_path(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise VolumeError(path, f"dangling symbolic link to {os.readlink(path)}")
    if not path.exists():
        raise VolumeError(path, "file does not exist")
    if not path.is_file():
        raise VolumeError(path, "not a regular file (is it a directory?)")
    if not os.access(path, os.R_OK):
        raise VolumeError(path, "file is not readable (permission denied)")
    name = path.name.lower()
    if not name.endswith(SUPPORTED_SUFFIXES):
        raise VolumeError(path, f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _open_image(path: Path) -> nib.spatialimages.SpatialImage:
    """Open ``path`` with nibabel; a single-file ``.nii.gz`` is decompressed whole first.

    nibabel stops reading a gzip stream once it has the voxels, so the member's CRC32 and length
    trailer are never checked and a corrupted stream whose deflate blocks still decode would
    pass as valid data. ``gzip.decompress`` reads to the end and verifies the trailer, and one
    call over the whole file is no slower than nibabel's streamed reads.
    """
    if not path.name.lower().endswith(".nii.gz"):
        return nib.load(path, mmap=False)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise VolumeError(path, f"corrupt or truncated compressed data: {exc}") from exc
    sizeof_hdr = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(raw[:4], "big")
    klass = nib.Nifti2Image if sizeof_hdr == 540 else nib.Nifti1Image
    return klass.from_bytes(raw)


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop singleton axes beyond the third (a (x, y, z, 1) file is a 3D volume)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_volume(path: str | os.PathLike) -> LoadedVolume:
    """Load ``path`` fully into memory as float32, raising VolumeError on any failure.

    Accepts 3D and 4D images only (after dropping trailing singleton axes). The affine is the
    one nibabel chooses (sform, else qform, else a zooms-only fallback) and must be finite and
    invertible.
    """
    path = Path(path)
    _check_path(path)
    try:
        img = _open_image(path)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        nib.wrapstruct.WrapStructError,
    ) as exc:
        raise VolumeError(path, f"not a readable NIfTI/Analyze image: {exc}") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise VolumeError(path, f"corrupt compressed stream while reading the header: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise VolumeError(path, f"cannot read the header: {exc}") from exc
    if not isinstance(img, nib.AnalyzeImage):  # base of every NIfTI-1/2 image and pair
        raise VolumeError(path, f"{type(img).__name__} is not a NIfTI or Analyze image")

    data_file = img.file_map["image"].filename
    if data_file is not None and not Path(data_file).is_file():
        raise VolumeError(path, f"the paired data file {data_file} does not exist")

    header_shape = tuple(int(n) for n in img.shape)
    shape = _squeeze_trailing(header_shape)
    if len(shape) not in (3, 4):
        raise VolumeError(path, f"expected a 3D or 4D image, got {len(header_shape)}D shape {header_shape}")
    if min(shape) < 1:
        raise VolumeError(path, f"header declares an empty dimension: shape {header_shape}")

    disk_dtype = img.get_data_dtype()
    if disk_dtype.kind not in "iuf" or disk_dtype.fields is not None:
        raise VolumeError(path, f"unsupported voxel type {disk_dtype} (expected integer or real)")
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise VolumeError(path, f"non-finite intensity scaling (slope={slope}, inter={inter})")

    try:
        data = np.asarray(img.dataobj.get_unscaled()).reshape(shape)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise VolumeError(path, f"corrupt or truncated compressed data: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise VolumeError(
            path, f"voxel data do not match the header (shape {header_shape}, {disk_dtype}): {exc}"
        ) from exc
    data = _to_float32(data, float(slope), float(inter))

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, f"affine is not finite and invertible:\n{affine}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    return LoadedVolume(
        data=data,
        affine=affine,
        spacing=zooms,
        disk_dtype=np.dtype(disk_dtype),
        may_be_nonfinite=disk_dtype.kind == "f",
    )


def _to_float32(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Apply scl_slope/scl_inter in float32 without a float64 copy of the volume.

    With an intercept, ``raw * slope + inter`` in float32 can turn the stored value meaning
    exactly 0 (skull-stripped background) into rounding noise. When that stored value is an
    integer z, computing ``(raw - z) * slope`` instead keeps it exactly 0.
    """
    if inter == 0.0:
        if slope == 1.0:
            return raw.astype(np.float32, copy=raw.dtype != np.float32 or not raw.flags.writeable)
        return np.multiply(raw, np.float32(slope), dtype=np.float32)
    zero = -inter / slope
    if raw.dtype.kind in "iu" and zero == round(zero):
        out = np.subtract(raw, np.float32(zero), dtype=np.float32)
        out *= np.float32(slope)
        return out
    out = np.multiply(raw, np.float32(slope), dtype=np.float32)
    out += np.float32(inter)
    return out
