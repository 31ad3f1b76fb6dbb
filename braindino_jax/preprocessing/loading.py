"""Read a NIfTI-1/2 or Analyze volume's stored voxels and scaling, or fail with VolumeError.

nibabel parses headers lazily; a truncated or corrupt data block only shows up when the voxels
are read. Reading them here, inside one try block, turns every such failure into a VolumeError
that names the file, so a batch job can record it and go on.

Voxels stay in their stored type: ``LoadedVolume.to_float32`` applies the scaling to whatever
region a caller reads, so preprocessing can find the foreground on the stored integers and
convert only the voxels around it.
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
    """Stored voxels (3D or 4D, unscaled, possibly read-only) with their scaling and geometry."""

    stored: np.ndarray  # the file's voxel values in its own dtype, scaling not applied
    slope: float
    inter: float
    affine: np.ndarray  # voxel → world (RAS mm), 4x4 float64
    spacing: tuple[float, ...]  # header zooms of the spatial (and time) axes

    @property
    def may_be_nonfinite(self) -> bool:
        """False for integer data: load_volume rejects a scaling that would take them past float32."""
        return self.stored.dtype.kind == "f"

    def to_float32(self, stored: np.ndarray) -> np.ndarray:
        """Apply scl_slope/scl_inter to ``stored`` (all or part of ``self.stored``) in float32.

        No float64 copy is made. With an intercept, ``raw * slope + inter`` in float32 can turn
        the stored value meaning exactly 0 (skull-stripped background) into rounding noise; when
        that stored value is an integer z, computing ``(raw - z) * slope`` keeps it exactly 0.
        Element-wise, so converting a region equals cropping the converted volume.
        """
        slope, inter = self.slope, self.inter
        if inter == 0.0:
            if slope == 1.0:
                return stored.astype(np.float32, copy=stored.dtype != np.float32 or not stored.flags.writeable)
            return np.multiply(stored, np.float32(slope), dtype=np.float32)
        zero = self._intercept_zero()
        if zero is not None:
            out = np.subtract(stored, np.float32(zero), dtype=np.float32)
            out *= np.float32(slope)
            return out
        out = np.multiply(stored, np.float32(slope), dtype=np.float32)
        out += np.float32(inter)
        return out

    def stored_zero(self) -> int | None:
        """The stored value whose float32 scaled value is 0, when no other stored value's is.

        Then ``stored != stored_zero()`` is exactly ``to_float32(stored) != 0``, without the
        conversion. None for float data and wherever that equivalence is not guaranteed
        (a non-integer zero, or integers too wide for float32 to keep them apart).
        """
        dtype = self.stored.dtype
        if dtype.kind not in "iu" or np.float32(self.slope) == 0:
            return None
        if self.inter == 0.0:
            return 0  # a nonzero integer times a nonzero slope is never 0
        zero = self._intercept_zero()
        info = np.iinfo(dtype)
        if zero is None or dtype.itemsize > 2 or not info.min <= zero <= info.max:
            return None
        return zero

    def _intercept_zero(self) -> int | None:
        """-inter / slope, for integer data where that is an integer; else None."""
        zero = -self.inter / self.slope
        if self.stored.dtype.kind in "iu" and zero == round(zero):
            return int(round(zero))
        return None


def _scaling_overflows(volume: LoadedVolume) -> bool:
    """Whether scaling turns some stored integer into +-inf in float32 (a garbage scl_slope).

    The dtype's range bounds the scaled values, so the stored extremes are read (one pass)
    only when that bound comes within a factor 2 of float32's largest value; scaling is
    monotone, so if any voxel overflows, an extreme does.
    """
    info = np.iinfo(volume.stored.dtype)
    bound = max(-float(info.min), float(info.max)) * abs(volume.slope) + abs(volume.inter)
    if bound < 0.5 * float(np.finfo(np.float32).max):
        return False
    extremes = np.array([volume.stored.min(), volume.stored.max()], volume.stored.dtype)
    with np.errstate(over="ignore"):
        return not np.all(np.isfinite(volume.to_float32(extremes)))


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


def _gunzip(data: bytes) -> bytes:
    """Decompress every member of a gzip file, with each member's CRC32 and length checked.

    nibabel stops reading a gzip stream once it has the voxels, so the trailer is never checked
    and a corrupted stream whose deflate blocks still decode would pass as valid data. zlib's
    gzip mode (wbits 16 + 15) verifies the trailer while it inflates, which costs less than
    ``gzip.decompress``'s separate CRC pass over the output. Zero padding after the last member
    is ignored, as gzip does.
    """
    parts = []
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        parts.append(inflater.decompress(data))
        if not inflater.eof:
            raise EOFError("compressed stream ended before its end-of-stream marker")
        data = inflater.unused_data
        if not data.strip(b"\0"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _open_image(path: Path) -> tuple[nib.spatialimages.SpatialImage, bytes | None]:
    """Open ``path`` with nibabel; a single-file ``.nii.gz`` is decompressed whole first (see
    ``_gunzip``) and its decompressed bytes are returned too, so the voxels can be viewed in
    place instead of copied out of nibabel's in-memory file."""
    if not path.name.lower().endswith(".nii.gz"):
        return nib.load(path, mmap=False), None
    try:
        raw = _gunzip(path.read_bytes())
    except (EOFError, zlib.error) as exc:
        raise VolumeError(path, f"corrupt or truncated compressed data: {exc}") from exc
    sizeof_hdr = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(raw[:4], "big")
    klass = nib.Nifti2Image if sizeof_hdr == 540 else nib.Nifti1Image
    return klass.from_bytes(raw), raw


def _stored_voxels(img: nib.AnalyzeImage, raw: bytes | None, shape: tuple[int, ...]) -> np.ndarray:
    """The unscaled voxels, shaped ``shape``: a read-only view of ``raw`` when given."""
    if raw is None:
        return np.asarray(img.dataobj.get_unscaled()).reshape(shape)
    dtype = img.get_data_dtype()
    offset = int(img.dataobj.offset)
    needed = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < offset + needed:
        raise ValueError(f"{needed} bytes of voxel data expected from offset {offset}, "
                         f"the file holds {max(len(raw) - offset, 0)}")
    return np.frombuffer(raw, dtype, count=needed // dtype.itemsize, offset=offset).reshape(shape, order="F")


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop singleton axes beyond the third (a (x, y, z, 1) file is a 3D volume)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_volume(path: str | os.PathLike) -> LoadedVolume:
    """Read ``path``'s stored voxels and scaling into memory, raising VolumeError on any failure.

    Accepts 3D and 4D images only (after dropping trailing singleton axes). The affine is the
    one nibabel chooses (sform, else qform, else a zooms-only fallback) and must be finite and
    invertible.
    """
    path = Path(path)
    _check_path(path)
    try:
        img, raw = _open_image(path)
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
        stored = _stored_voxels(img, raw, shape)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise VolumeError(path, f"corrupt or truncated compressed data: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise VolumeError(
            path, f"voxel data do not match the header (shape {header_shape}, {disk_dtype}): {exc}"
        ) from exc

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, f"affine is not finite and invertible:\n{affine}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    volume = LoadedVolume(stored=stored, slope=float(slope), inter=float(inter), affine=affine, spacing=zooms)
    if disk_dtype.kind in "iu" and _scaling_overflows(volume):
        raise VolumeError(
            path, f"scaled intensities overflow float32 (is the header's scl_slope/scl_inter sane?): "
            f"slope={slope:g}, inter={inter:g}",
        )
    return volume
