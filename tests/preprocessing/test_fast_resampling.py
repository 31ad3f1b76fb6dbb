"""The fast resampling paths against scipy's general affine_transform on the whole grid.

``resample`` interpolates axis-aligned inputs separably and ``preprocess_volume`` resamples only
the output box that can hold foreground; both must give what the general path gives on the
full field of view (scipy.ndimage.affine_transform, double precision inside), up to float32
rounding.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from braindino_jax.preprocessing import resampling, volume
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.preprocessing.resampling import covering_box, resample, target_grid
from braindino_jax.preprocessing.volume import preprocess_volume

ORDERS = {"nearest": 0, "linear": 1, "cubic": 3}


def _axis_aligned_affine(rng, flips: bool, permute: bool) -> np.ndarray:
    """Random spacing and origin; voxel axes along world axes, optionally flipped/permuted."""
    order = rng.permutation(3) if permute else np.arange(3)
    signs = rng.choice([-1.0, 1.0], 3) if flips else np.ones(3)
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for voxel_axis, world_axis in enumerate(order):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * rng.uniform(0.7, 3.2)
    affine[:3, 3] = rng.uniform(-30, 30, 3)
    return affine


def _scipy_reference(data, affine, target, kind):
    """The general path written out: full output grid, full 3x3 matrix, float64 source."""
    out_affine, out_shape = target_grid(affine, data.shape, target)
    mapping = np.linalg.inv(affine) @ out_affine
    source = data if kind == "nearest" else data.astype(np.float64)
    return ndimage.affine_transform(
        source, mapping[:3, :3], mapping[:3, 3], output_shape=out_shape,
        order=ORDERS[kind], mode="constant", cval=0,
    ), out_affine


@pytest.mark.parametrize("flips,permute", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["nearest", "linear", "cubic"])
def test_separable_path_equals_affine_transform(flips, permute, kind):
    rng = np.random.default_rng([int(flips), int(permute), ORDERS[kind]])
    for _ in range(4):
        shape = tuple(int(n) for n in rng.integers(1, 16, 3))
        affine = _axis_aligned_affine(rng, flips, permute)
        target = tuple(rng.uniform(0.6, 2.5, 3))
        values = rng.normal(100.0, 30.0, shape)
        data = values.astype(np.int16) if kind == "nearest" else values.astype(np.float32)
        mapping = np.linalg.inv(affine) @ target_grid(affine, shape, target)[0]
        assert resampling._axis_permutation(mapping[:3, :3]) is not None  # the separable path runs
        got, got_affine = resample(data, affine, target, kind)
        want, want_affine = _scipy_reference(data, affine, target, kind)
        np.testing.assert_array_equal(got_affine, want_affine)
        assert got.shape == want.shape
        if kind == "nearest":
            assert got.dtype == np.int16
            np.testing.assert_array_equal(got, want)
        else:
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(values).max())


@pytest.mark.parametrize("kind", ["nearest", "linear"])
def test_axes_already_on_the_target_lattice_equal_affine_transform(kind):
    # 1 x 1 x 3 mm on the 1 mm lattice: x and y need no interpolation, only z does.
    data = np.random.default_rng(5).uniform(0, 100, (17, 13, 9)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [-8.0, 5.0, -12.0]
    got, _ = resample(data, affine, (1.0, 1.0, 1.0), kind)
    want, _ = _scipy_reference(data, affine, (1.0, 1.0, 1.0), kind)
    assert got.shape == (17, 13, 25)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_a_mask_resampled_separably_thresholds_like_scipy():
    # A ragged 0/1 mask at 2.0 x 2.4 x 2.4 -> 2.2 mm puts many samples on exactly 0.5, where
    # float32 work would round some below; float64 work for non-float32 input (the masks)
    # makes the >= 0.5 decision match scipy's double sums.
    rng = np.random.default_rng(7)
    shape = (40, 36, 18)
    mask = (rng.random(shape) < 0.5).astype(np.uint8)
    affine = np.diag([2.0, 2.4, 2.4, 1.0])
    affine[:3, 3] = -(np.array(shape) // 2) * np.diag(affine)[:3]
    got, _ = resample(mask, affine, (2.2, 2.2, 2.2), "linear")
    want, _ = _scipy_reference(mask, affine, (2.2, 2.2, 2.2), "linear")
    assert np.mean(np.abs(want - 0.5) < 1e-9) > 0.01  # the ties this test is about do occur
    np.testing.assert_array_equal(got >= 0.5, want.astype(np.float32) >= 0.5)


def _oblique_affine(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.3, 1.1, 2.7])
    affine[:3, 3] = [-20.0, -25.0, -30.0]
    return affine


@pytest.mark.parametrize("degrees", [0.0, 14.0])
@pytest.mark.parametrize("kind", ["linear", "nearest"])
def test_box_values_equal_the_full_grid_and_nothing_is_outside(degrees, kind):
    rng = np.random.default_rng(3)
    data = np.zeros((30, 40, 22), np.float32)
    lo, hi = (6, 9, 4), (21, 30, 15)
    data[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = rng.uniform(1, 50, (16, 22, 12))
    affine = _oblique_affine(degrees)
    grid = target_grid(affine, data.shape, (1.0, 1.0, 1.0))
    full, full_affine = resample(data, affine, (1.0, 1.0, 1.0), kind, grid)
    box = covering_box(affine, grid, lo, hi)
    part, part_affine = resample(data, affine, (1.0, 1.0, 1.0), kind, grid, box)
    assert part.size < 0.6 * full.size
    np.testing.assert_allclose(part, full[box], rtol=0, atol=1e-4)
    outside = full.copy()
    outside[box] = 0
    assert not outside.any()  # the box holds every nonzero sample
    np.testing.assert_allclose(part_affine[:3, 3], full_affine[:3, :3] @ [s.start for s in box] + full_affine[:3, 3])


@pytest.fixture
def general_path(monkeypatch):
    """Make preprocess_volume resample like before the fast paths: the whole field of view,
    image and mask alike through scipy's affine_transform."""

    def use_general_path():
        monkeypatch.setattr(resampling, "_axis_permutation", lambda linear: None)
        monkeypatch.setattr(volume, "is_separable", lambda mapping: True)  # not the oblique path

        def whole_grid(affine, grid, lo, hi, pad):
            return tuple(slice(0, n) for n in grid[1])

        monkeypatch.setattr(volume, "covering_box", whole_grid)

    return use_general_path


def _edge_touching_volume() -> np.ndarray:
    """Foreground cut by the field of view on three faces, so box clipping is exercised."""
    rng = np.random.default_rng(11)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (34, 30, 14)], indexing="ij"), -1)
    inside = np.sum((grid / [1.1, 0.8, 1.3]) ** 2, axis=-1) <= 1.0
    return np.where(inside, rng.uniform(20, 300, inside.shape), 0).astype(np.int16)


CASES = {
    "phantom_LPS_linear": (
        dict(orientation="LPS", spacing=(2.4, 2.4, 6.0)),
        PrepConfig(target_spacing=(2.0, 2.0, 2.0), size=112, margin=4),
    ),
    "phantom_RAS_cubic_n_slices": (
        dict(orientation="RAS", spacing=(2.5, 2.2, 5.0)),
        PrepConfig(target_spacing=(2.0, 2.0, 2.0), interpolation="cubic", n_slices=40, size=112),
    ),
    "phantom_oblique": (
        dict(orientation="LAS", oblique_deg=9.0, spacing=(2.4, 2.4, 4.0)),
        PrepConfig(target_spacing=(2.0, 2.0, 2.0), size=112, margin=4),
    ),
    "phantom_oblique_native_slices": (
        dict(orientation="LPS", oblique_deg=12.0, spacing=(2.4, 2.4, 5.0)),
        PrepConfig(target_spacing=(2.0, 2.0, 2.0), size=112, margin=4),
    ),
    "raw_head_oblique_otsu": (
        dict(orientation="RAS", oblique_deg=15.0, spacing=(2.2, 2.2, 2.2), skull_stripped=False),
        PrepConfig(target_spacing=(2.0, 2.0, 2.0), mask_method="otsu", size=112, margin=4),
    ),
    "raw_head_otsu_shrunk": (
        dict(orientation="PIR", spacing=(2.0, 2.4, 2.4), skull_stripped=False),
        PrepConfig(target_spacing=(2.2, 2.2, 2.2), mask_method="otsu", size=48, margin=6),
    ),
    "edge_touching": (None, PrepConfig(target_spacing=(1.0, 1.0, 0.8), size=64, margin=10, min_extent_mm=0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sub_box_resampling_keeps_what_full_fov_resampling_keeps(tmp_path, general_path, case):
    phantom_kwargs, config = CASES[case]
    path = tmp_path / f"{case}.nii.gz"
    if phantom_kwargs is None:
        nib.save(nib.Nifti1Image(_edge_touching_volume(), np.diag([1.3, 1.1, 2.0, 1.0])), path)
    else:
        kwargs = {"skull_stripped": True, **phantom_kwargs}
        write_phantom(path, 4, noise=0.02, **kwargs)
    (fast,) = preprocess_volume(path, config)
    general_path()
    (full,) = preprocess_volume(path, config)
    np.testing.assert_array_equal(fast.slice_indices, full.slice_indices)
    assert (fast.n_slices, fast.slices_dropped, fast.spacing) == (full.n_slices, full.slices_dropped, full.spacing)
    assert fast.slices.shape == full.slices.shape
    # float32 vs double interpolation may round a value sitting on a .5 boundary the other way.
    diff = np.abs(fast.slices.astype(int) - full.slices.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    assert (fast.fg_mean, fast.fg_std) == pytest.approx((full.fg_mean, full.fg_std), rel=1e-5)
