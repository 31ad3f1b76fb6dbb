"""Every on-disk dtype, scaling slopes, NIfTI-1/2, Analyze and nibabel's own files, end to end."""

from __future__ import annotations

import dataclasses
import os
import re

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError, VolumeSkipped
from braindino_jax.preprocessing.volume import preprocess_volume

SMALL = PrepConfig(min_extent_mm=0, target_spacing=None, size=48, margin=2)


def _check_against_reference(result, volume, reference):
    want, kept, fg_mean, fg_std = reference(volume, SMALL.min_foreground_fraction, SMALL.clip_percentiles, SMALL.size, SMALL.margin)
    assert result.slices.dtype == np.uint8 and result.slices.shape == want.shape
    np.testing.assert_array_equal(result.slice_indices, kept)
    # float32 vs float64 may round a value sitting on a .5 boundary the other way.
    assert np.abs(result.slices.astype(int) - want.astype(int)).max() <= 1
    assert np.mean(result.slices != want) < 1e-3
    assert result.fg_mean == pytest.approx(fg_mean, rel=1e-4)
    assert result.fg_std == pytest.approx(fg_std, rel=1e-4)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_every_dtype_matches_float64_reference(tmp_path, blob, reference, dtype, suffix):
    volume = blob(seed=1)
    if dtype == "int8":
        volume = np.floor(volume / 2)  # fits int8's 127
    img = nib.Nifti1Image(volume.astype(dtype), np.eye(4), dtype=dtype)
    img.header.set_slope_inter(1.0, 0.0)
    path = tmp_path / f"vol{suffix}"
    nib.save(img, path)
    (result,) = preprocess_volume(path, SMALL)
    _check_against_reference(result, volume, reference)


def test_scaling_slope_and_intercept_are_applied(tmp_path, blob, reference):
    volume = blob(seed=2)  # integers 0..200
    raw = (volume * 4 + 20).astype(np.int16)  # background stored as 20
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.25, -5.0)  # 20 * 0.25 - 5 == 0: background is exactly 0
    nib.save(img, tmp_path / "scaled.nii.gz")
    (result,) = preprocess_volume(tmp_path / "scaled.nii.gz", SMALL)
    _check_against_reference(result, volume, reference)
    # A different stored range with the same scaled values must give identical output.
    img2 = nib.Nifti1Image(volume.astype(np.int16), np.eye(4))
    img2.header.set_slope_inter(1.0, 0.0)
    nib.save(img2, tmp_path / "plain.nii.gz")
    (plain,) = preprocess_volume(tmp_path / "plain.nii.gz", SMALL)
    np.testing.assert_array_equal(result.slices, plain.slices)


@pytest.mark.parametrize("kind", ["nifti2", "nifti1_pair", "analyze"])
def test_nifti2_pairs_and_analyze(tmp_path, blob, reference, kind):
    volume = blob(seed=3)
    if kind == "nifti2":
        img, name = nib.Nifti2Image(volume.astype(np.int16), np.eye(4)), "v.nii.gz"
    elif kind == "nifti1_pair":
        img, name = nib.Nifti1Pair(volume.astype(np.int16), np.eye(4)), "v.hdr"
    else:
        img, name = nib.AnalyzeImage(volume.astype(np.int16), np.eye(4)), "v.hdr"
    nib.save(img, tmp_path / name)
    (result,) = preprocess_volume(tmp_path / name, SMALL)
    # Analyze has no orientation field: nibabel assumes radiological (LAS) storage.
    canonical = volume[::-1] if kind == "analyze" else volume
    _check_against_reference(result, canonical, reference)
    assert result.orientation == ("LAS" if kind == "analyze" else "RAS")


# name: the axial spacing of the result (native slices beyond 2x upsampling to 1 mm), or the
# reason a default run skips it (nibabel's test images include toys no brain corpus should take).
SHIPPED = {
    "anatomical.nii": 1.0,  # 2 mm: upsampled 2x, within the limit
    "example4d.nii.gz": 2.2,  # 2.2 mm slices kept
    "functional.nii": 8.0,
    "reoriented_anat_moved.nii": 4.0,
    "example_nifti2.nii.gz": "foreground spans only 62 x 38 mm in-plane",
    "standard.nii.gz": "A-axis slices 3.00 mm apart (thick coronal slices)",
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_files_shipped_with_nibabel_run_end_to_end(name):
    path = os.path.join(data_path, name)
    config = PrepConfig(four_d_policy="all", size=64, min_foreground_fraction=0.01)
    expected = SHIPPED[name]
    if isinstance(expected, str):
        with pytest.raises(VolumeSkipped, match=re.escape(expected)):
            preprocess_volume(path, config)
        config = dataclasses.replace(config, min_extent_mm=0, max_slice_upsampling=None)
        expected = 1.0
    results = preprocess_volume(path, config)
    img = nib.load(path)
    n_vol = img.shape[3] if len(img.shape) == 4 and img.shape[3] > 1 else 1
    assert [r.volume_index for r in results] == list(range(n_vol))
    for r in results:
        assert r.slices.dtype == np.uint8 and r.slices.shape[1:] == (64, 64) and len(r.slices) >= 1
        assert len(r.slices) == len(r.slice_indices) == r.n_slices - r.slices_dropped
        assert np.all((r.slice_indices >= 0) & (r.slice_indices < r.n_slices))
        assert r.slices.max() == 255 and 1 <= r.fg_mean <= 255 and r.fg_std > 0
        assert r.spacing == pytest.approx((1.0, 1.0, expected), rel=1e-5)
        assert r.orientation == "".join(nib.aff2axcodes(img.affine))


def test_cifti_file_with_nii_name_is_rejected_clearly():
    path = os.path.join(data_path, "row_major.dconn.nii")
    with pytest.raises(VolumeError, match="Cifti2Image is not a NIfTI or Analyze image") as err:
        preprocess_volume(path, SMALL)
    assert err.value.path == path


@pytest.mark.parametrize("name", ["analyze.hdr", "nifti1.hdr", "nifti2.hdr"])
def test_shipped_headers_without_their_img_file_name_the_missing_file(name):
    # nibabel ships these headers alone, which is exactly the "half a pair" failure.
    path = os.path.join(data_path, name)
    with pytest.raises(VolumeError, match=r"paired data file .*\.img does not exist") as err:
        preprocess_volume(path, SMALL)
    assert str(err.value).startswith(path + ": ")
