"""The stored-integer path (mask on the file's integers, scale only the foreground box) must give
exactly what converting the whole volume to float32 first gives: same slices, same moments to
the last bit, since records are compared byte for byte across runs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from braindino_jax.preprocessing import loading
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import make_phantom
from braindino_jax.preprocessing.volume import preprocess_volume

# (dtype, slope, intercept): plain integers, a slope, and an intercept whose zero is an integer.
SCALINGS = [("uint8", 1.0, 0.0), ("int16", 0.37, 0.0), ("int16", 0.5, 12.5), ("uint16", -2.0, 40.0),
            ("int32", 3.0, 0.0)]


def _write(tmp_path, dtype, slope, inter, orientation):
    phantom = make_phantom(11, spacing=(4.0, 4.0, 4.0), orientation=orientation, skull_stripped=True)
    zero = -inter / slope
    stored = np.where(phantom.image > 0, zero + np.round(phantom.image / phantom.image.max() * 200) + 1, zero)
    img = nib.Nifti1Image(stored.astype(dtype), phantom.affine)
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / f"{dtype}_{orientation}.nii.gz"
    nib.save(img, path)
    return path


@pytest.mark.parametrize("dtype,slope,inter", SCALINGS)
@pytest.mark.parametrize("orientation", ["LPS", "PIR"])
@pytest.mark.parametrize("target", [None, (3.0, 3.0, 3.0)])
def test_stored_integer_path_equals_float_path(tmp_path, monkeypatch, dtype, slope, inter, orientation, target):
    path = _write(tmp_path, dtype, slope, inter, orientation)
    assert loading.load_volume(path).stored_zero() is not None  # the fast path is taken
    config = PrepConfig(min_extent_mm=0, target_spacing=target, size=48, margin=2)
    fast = preprocess_volume(path, config)
    monkeypatch.setattr(loading.LoadedVolume, "stored_zero", lambda self: None)
    slow = preprocess_volume(path, config)
    for a, b in zip(fast, slow, strict=True):
        assert np.array_equal(a.slices, b.slices) and np.array_equal(a.slice_indices, b.slice_indices)
        assert (a.fg_mean, a.fg_std, a.n_slices, a.spacing) == (b.fg_mean, b.fg_std, b.n_slices, b.spacing)


@pytest.mark.parametrize("dtype,slope,inter,expected", [
    ("int16", 2.0, 0.0, 0),
    ("int16", 0.5, 12.5, -25),
    ("int16", 0.3, 1.0, None),  # zero at -3.33: no stored value maps to exactly 0
    ("int32", 0.5, 12.5, None),  # beyond 2**24, float32 no longer keeps int32 values apart
    ("int16", 1.0, 1e6, None),  # the zero lies outside int16
    ("float32", 1.0, 0.0, None),
])
def test_stored_zero_only_where_exact(dtype, slope, inter, expected):
    volume = loading.LoadedVolume(np.zeros((2, 2, 2), dtype), slope, inter, np.eye(4), (1.0, 1.0, 1.0))
    assert volume.stored_zero() == expected
    if expected is not None:
        values = np.arange(-300, 300).astype(dtype)
        scaled = loading.LoadedVolume(values, slope, inter, np.eye(4), (1.0,)).to_float32(values)
        assert np.array_equal(scaled != 0, values != expected)
