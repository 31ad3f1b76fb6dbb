"""Bad input at the level of preprocess_volume: a VolumeError that names the file and the reason."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError
from braindino_jax.preprocessing.volume import preprocess_volume

CONFIG = PrepConfig(min_extent_mm=0, target_spacing=None, size=48, margin=2)


def _save(tmp_path, data, name="v.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _expect(path, pattern, config=CONFIG):
    with pytest.raises(VolumeError, match=pattern) as err:
        preprocess_volume(path, config)
    assert err.value.path == os.fspath(path)
    assert str(err.value) == f"{os.fspath(path)}: {err.value.reason}"
    return err.value


def test_truncated_gzip(tmp_path, blob):
    path = _save(tmp_path, blob().astype(np.int16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(path, "corrupt or truncated compressed data")


def test_corrupt_gzip_stream(tmp_path, blob):
    path = _save(tmp_path, blob().astype(np.int16))
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # zero a run of deflate bytes: CRC or stream error
    path.write_bytes(bytes(data))
    _expect(path, "corrupt|truncated|do not match")


def test_gzip_checksum_is_verified(tmp_path, blob):
    """A stream whose deflate data decode but whose CRC32 trailer disagrees is rejected."""
    path = _save(tmp_path, blob().astype(np.int16))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # first byte of the CRC32 trailer
    path.write_bytes(bytes(data))
    _expect(path, "corrupt or truncated compressed data")


def test_multi_member_gzip_reads_whole(tmp_path, blob):
    """A .nii.gz written as two gzip members (as parallel compressors do) loads all its voxels."""
    path = _save(tmp_path, blob().astype(np.int16))
    raw = gzip.decompress(path.read_bytes())
    split = tmp_path / "split.nii.gz"
    split.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(16))
    want, got = preprocess_volume(path, CONFIG), preprocess_volume(split, CONFIG)
    assert np.array_equal(got[0].slices, want[0].slices) and got[0].fg_mean == want[0].fg_mean


def test_header_dims_disagree_with_data_size(tmp_path, blob):
    for name in ("short.nii", "short.nii.gz"):
        img = nib.Nifti1Image(blob().astype(np.int16), np.eye(4))
        img.header.set_data_shape((24, 28, 40))  # twice the slices that are stored
        raw = img.header.binaryblock + b"\0" * 4 + blob().astype(np.int16).tobytes(order="F")
        path = tmp_path / name
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        _expect(path, r"do not match the header|truncated")


@pytest.mark.parametrize("shape", [(30, 30), (8, 8, 8, 2, 2)])
def test_2d_and_5d_images_are_rejected(tmp_path, shape):
    path = _save(tmp_path, np.ones(shape, np.int16))
    _expect(path, rf"expected a 3D or 4D image, got {len(shape)}D")


def test_trailing_singleton_axes_make_a_3d_volume(tmp_path, blob):
    path = _save(tmp_path, blob().astype(np.int16)[..., None, None])
    (result,) = preprocess_volume(path, CONFIG)
    assert result.source_shape == blob().shape


def test_all_zero_volume(tmp_path):
    _expect(_save(tmp_path, np.zeros((10, 10, 10), np.int16)), "all voxels are zero")


def test_all_nan_volume(tmp_path):
    _expect(_save(tmp_path, np.full((10, 10, 10), np.nan, np.float32)), "all 1000 voxels are NaN or Inf")


def test_constant_foreground(tmp_path):
    _expect(_save(tmp_path, np.full((10, 10, 10), 7, np.int16)), "constant")


def test_non_nifti_file_with_nii_name(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is a text file, not an image\n" * 20)
    _expect(path, "not a readable NIfTI/Analyze image")


def test_directory_named_like_a_volume(tmp_path):
    path = tmp_path / "x.nii"
    path.mkdir()
    _expect(path, "not a regular file")


def test_dangling_symlink(tmp_path):
    path = tmp_path / "gone.nii.gz"
    path.symlink_to(tmp_path / "never-written.nii.gz")
    _expect(path, "dangling symbolic link")


def test_missing_file_and_unsupported_suffix(tmp_path):
    _expect(tmp_path / "absent.nii.gz", "does not exist")
    other = tmp_path / "scan.dcm"
    other.write_bytes(b"DICM")
    _expect(other, "unsupported file type")


def test_four_d_policies(tmp_path, blob):
    series = np.stack([blob(seed=s) for s in range(3)], axis=-1).astype(np.int16)
    path = _save(tmp_path, series)
    first = preprocess_volume(path, CONFIG)
    every = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=None, size=48, margin=2, four_d_policy="all"))
    assert [r.volume_index for r in first] == [0]
    assert [r.volume_index for r in every] == [0, 1, 2]
    np.testing.assert_array_equal(first[0].slices, every[0].slices)
    assert not np.array_equal(every[0].slices, every[1].slices)
    assert all(r.source_shape == series.shape for r in every)
    _expect(path, "4D image with 3 volumes and four_d_policy='skip'",
            PrepConfig(min_extent_mm=0, target_spacing=None, size=48, four_d_policy="skip"))


def test_4d_with_an_empty_volume_names_it(tmp_path, blob):
    series = np.stack([blob(), np.zeros(blob().shape)], axis=-1).astype(np.int16)
    _expect(_save(tmp_path, series), r"all voxels are zero \(volume 1 of the 4D series\)",
            PrepConfig(min_extent_mm=0, target_spacing=None, size=48, four_d_policy="all"))


def test_no_slice_reaches_the_fraction_threshold(tmp_path):
    data = np.zeros((20, 20, 10), np.int16)
    data[5, 5, :] = 100
    data[6, 6, :] = 50
    _expect(_save(tmp_path, data), r"no axial slice has a foreground fraction >= 0.05 \(largest is 0.0050\)")


def test_bad_config_is_rejected_before_reading(tmp_path):
    from braindino_jax.preprocessing.errors import ConfigError

    with pytest.raises(ConfigError, match="PrepConfig.four_d_policy"):
        preprocess_volume(tmp_path / "absent.nii", PrepConfig(four_d_policy="middle"))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Otsu's histogram of garbage
@pytest.mark.parametrize("mask_method", ["nonzero", "otsu"])
@pytest.mark.parametrize("slope", [1.7e36, 1e38])
def test_scaling_that_overflows_float32_names_the_header_scaling(tmp_path, blob, slope, mask_method):
    # 1.7e36: every scaled voxel is finite, but float32 moments overflow; 1e38: voxels become inf
    # (an integer file holds no NaN/Inf, so that is the header's fault, whatever the mask).
    img = nib.Nifti1Image(blob().astype(np.int16), np.eye(4))
    img.header.set_slope_inter(slope, 0.0)
    path = tmp_path / "garbage_slope.nii.gz"
    nib.save(img, path)
    config = PrepConfig(min_extent_mm=0, target_spacing=None, size=48, margin=2, mask_method=mask_method)
    _expect(path, r"overflow float32 \(is the header's scl_slope/scl_inter sane\?\)", config)
