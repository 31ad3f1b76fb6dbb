"""Oblique volumes (the foreground-block trilinear path), thick slabs and too-small fields of view.

The oblique path must give scipy's ``affine_transform(order=1, mode="constant")`` values for the
image and its thresholded mask, wherever it computes them, and exactly 0 elsewhere. Thick slices
beyond ``max_slice_upsampling`` keep their native slices: output slice k is input slice k,
resampled within its plane only (checked against a 2D scipy reference).
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeSkipped
from braindino_jax.preprocessing.oblique import resample_near_foreground
from braindino_jax.preprocessing.orientation import to_canonical
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.preprocessing.resampling import box_mapping, covering_box, plan_grid, resample
from braindino_jax.preprocessing.volume import preprocess_volume


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _ellipsoid(rng, shape, radii):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    return np.sum((grid / radii) ** 2, axis=-1) <= 1.0


@pytest.mark.parametrize("zero_background", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_oblique_path_equals_affine_transform(seed, zero_background):
    """Random rotations and scalings, foreground inside the field of view or cut by it (radii
    above 1 reach the edges, where points past the voxel centres must read 0)."""
    rng = np.random.default_rng([seed, int(zero_background)])
    shape = tuple(int(n) for n in rng.integers(20, 44, 3))
    inside = _ellipsoid(rng, shape, rng.uniform(0.5, 1.3, 3))
    data = np.where(inside, rng.uniform(1, 100, shape), 0).astype(np.float32)
    if not zero_background:  # a head: the background is not zero, only the mask says where it is
        data += rng.uniform(0, 5, shape).astype(np.float32)
    mapping = np.eye(4)
    mapping[:3, :3] = _rotation(rng.normal(size=3), rng.uniform(3, 40)) @ np.diag(rng.uniform(0.5, 1.6, 3))
    mapping[:3, 3] = rng.uniform(-10, 10, 3)
    out_shape = tuple(int(n) for n in rng.integers(24, 56, 3))
    want = ndimage.affine_transform(data.astype(np.float64), mapping[:3, :3], mapping[:3, 3],
                                    output_shape=out_shape, order=1, mode="constant")
    want_mask = ndimage.affine_transform(inside.astype(np.float64), mapping[:3, :3], mapping[:3, 3],
                                         output_shape=out_shape, order=1, mode="constant") >= 0.5
    where = np.argwhere(inside)
    image, mask, part = resample_near_foreground(
        data, inside, tuple(where.min(0)), tuple(where.max(0)), mapping, out_shape,
        lambda a: a.astype(np.float32), zero_background, pad=(2, 2, 0))
    got, got_mask = np.zeros(out_shape, np.float32), np.zeros(out_shape, bool)
    got[part], got_mask[part] = image, mask
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # outside ``part`` too: there it is 0


def test_separable_sub_box_on_an_axis_already_on_the_lattice():
    """A sub-box whose z axis needs no interpolation (native 3 mm slices, in-plane 1.5 -> 1 mm)
    keeps the box's shape: the last tap of the cut is not a slice of the output."""
    data = np.random.default_rng(2).uniform(1, 9, (20, 18, 12)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    grid = (np.diag([1.0, 1.0, 3.0, 1.0]), (29, 26, 12))
    box = (slice(3, 20), slice(2, 22), slice(4, 9))
    got, _ = resample(data, affine, (1.0, 1.0, 3.0), "linear", grid, box, native_slices=True)
    mapping, _ = box_mapping(affine, grid[0], box, native_slices=True)
    want = ndimage.affine_transform(data.astype(np.float64), mapping[:3, :3], mapping[:3, 3],
                                    output_shape=(17, 20, 5), order=1, mode="constant")
    assert got.shape == (17, 20, 5)
    np.testing.assert_allclose(got, want, atol=1e-4)


SLAB = dict(shape=(88, 108, 10), spacing=(2.0, 2.0, 5.3), orientation="LPS", skull_stripped=True)


@pytest.fixture(scope="module")
def oblique_slab(tmp_path_factory):
    """10 slices spanning 53 mm, tilted 12 degrees: clinical thick FLAIR/T2."""
    path = tmp_path_factory.mktemp("slab") / "sub-01_FLAIR.nii.gz"
    write_phantom(path, 3, oblique_deg=12.0, **SLAB)
    return path


def test_thick_oblique_slab_keeps_its_native_slices(oblique_slab):
    config = PrepConfig(target_spacing=(2.0, 2.0, 2.0), size=128)  # 5.3 mm -> 2 mm would be 2.65x
    (kept,) = preprocess_volume(oblique_slab, config)
    assert kept.n_slices == 10 and kept.spacing == pytest.approx((2.0, 2.0, 5.3))
    assert kept.resampling == {"mode": "in-plane", "output_spacing_mm": [2.0, 2.0, 5.3],
                               "input_slice_spacing_mm": pytest.approx(5.3), "slice_upsampling": 1.0}
    (upsampled,) = preprocess_volume(oblique_slab, dataclasses.replace(config, max_slice_upsampling=None))
    assert upsampled.n_slices > 30 and upsampled.resampling["mode"] == "3d"
    assert upsampled.resampling["slice_upsampling"] == pytest.approx(2.65)


def test_native_slices_are_resampled_within_their_plane_only(oblique_slab):
    """Each output slice is its input slice resampled in 2D (scipy, order 1): nothing is
    interpolated across slices."""
    img = nib.load(oblique_slab)
    data, affine = to_canonical(np.asanyarray(img.dataobj).astype(np.float64), img.affine)
    plan = plan_grid(affine, data.shape, (2.0, 2.0, 2.0), 2.0)
    assert plan.mode == "in-plane" and plan.shape[2] == 10
    box = covering_box(affine, (plan.affine, plan.shape), (0, 0, 0), tuple(n - 1 for n in data.shape))
    mapping, _ = box_mapping(affine, plan.affine, box, native_slices=True)
    got, _ = resample(data.astype(np.float32), affine, (2.0, 2.0, 2.0), "linear",
                      (plan.affine, plan.shape), box, native_slices=True)
    assert np.array_equal(mapping[2], [0.0, 0.0, 1.0, box[2].start])
    shape = tuple(s.stop - s.start for s in box)
    for k in (0, 4, 9):
        want = ndimage.affine_transform(data[:, :, k + box[2].start], mapping[:2, :2], mapping[:2, 3],
                                        output_shape=shape[:2], order=1, mode="constant")
        np.testing.assert_allclose(got[:, :, k], want, rtol=0, atol=1e-3)


def test_thick_slices_that_are_not_axial_are_skipped(tmp_path):
    path = tmp_path / "sub-01_T2w.nii.gz"
    # 5 mm coronal slices: axial slices would be 5x interpolations between them.
    write_phantom(path, 1, shape=(88, 36, 88), spacing=(2.0, 5.0, 2.0), skull_stripped=True)
    with pytest.raises(VolumeSkipped, match=r"A-axis slices 5\.00 mm apart \(thick coronal slices\)"):
        preprocess_volume(path, PrepConfig(target_spacing=(2.0, 2.0, 2.0), size=128))
    (r,) = preprocess_volume(path, PrepConfig(target_spacing=(2.0, 2.0, 2.0), size=128, max_slice_upsampling=3.0))
    assert r.resampling["mode"] == "3d"


def test_a_field_of_view_too_small_to_be_a_brain_is_skipped(tmp_path):
    """A 20 mm cube (nibabel-style 10^3 DWI test volume at 2 mm) used to give 20 slices."""
    path = tmp_path / "sub-01_dwi.nii.gz"
    cube = np.zeros((10, 10, 10), np.int16)
    cube[1:9, 1:9, 1:9] = 100 + np.arange(512).reshape(8, 8, 8) % 50
    nib.save(nib.Nifti1Image(cube, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    with pytest.raises(VolumeSkipped, match="foreground spans only 17 x 17 mm in-plane, below min_extent_mm 60"):
        preprocess_volume(path, PrepConfig())
    assert len(preprocess_volume(path, PrepConfig(min_extent_mm=15.0))[0].slices) == 17
