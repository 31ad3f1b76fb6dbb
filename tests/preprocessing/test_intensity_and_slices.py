"""Masks, intensity storage, NaN policy, slice selection, config and phantom behaviour."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import ConfigError
from braindino_jax.preprocessing.foreground import foreground_mask, otsu_threshold
from braindino_jax.preprocessing.intensity import MAX_COUNTED_LEVELS, fit_intensity_scale, percentiles_inplace
from braindino_jax.preprocessing.phantom import LABELS, make_phantom, write_demo_dataset
from braindino_jax.preprocessing.slices import select_slices
from braindino_jax.preprocessing.volume import preprocess_volume


def test_otsu_matches_brute_force_search():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(20, 5, 3000), rng.normal(90, 12, 2000)]).astype(np.float32)
    t = otsu_threshold(values)
    # Brute force over every distinct cut, between-class variance from the paper's definition.
    s = np.sort(values.astype(np.float64))
    best, best_t = -1.0, None
    for cut in np.unique(np.round(np.linspace(s[0], s[-1], 2000), 3))[1:-1]:
        a, b = s[s <= cut], s[s > cut]
        var = len(a) * len(b) / len(s) ** 2 * (a.mean() - b.mean()) ** 2
        if var > best:
            best, best_t = var, cut
    bin_width = (s[-1] - s[0]) / 1024
    assert abs(t - best_t) <= 2 * bin_width + 0.1
    mask = foreground_mask(values.reshape(50, 10, 10), "otsu")
    assert mask.sum() == np.sum(values > t)


def test_percentile_mask_and_finite_exclusion():
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mask = foreground_mask(data, "percentile", 25.0)
    assert mask.sum() == 750  # everything above the 25th percentile (249.75)
    finite = np.ones(data.shape, bool)
    finite[0, 0, :] = False
    assert not foreground_mask(data, "nonzero", finite=finite)[0, 0].any()


def test_otsu_mask_on_a_raw_head_finds_the_head():
    ph = make_phantom(3, spacing=(4.0, 4.0, 4.0), noise=0.03)
    mask = foreground_mask(ph.image, "otsu")
    head = ph.labels > 0
    background = ph.labels == 0
    assert mask[background].mean() < 0.01  # noise stays out
    assert mask[ph.labels == LABELS["white_matter"]].mean() > 0.99
    assert mask[head].mean() > 0.6


def test_uint8_mapping_reproduces_the_foreground_zscore(tmp_path):
    rng = np.random.default_rng(4)
    data = np.zeros((30, 30, 12), np.float32)
    data[3:27, 3:27, :] = rng.lognormal(3.0, 0.6, size=(24, 24, 12))
    path = tmp_path / "z.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    config = PrepConfig(min_extent_mm=0, target_spacing=None, size=32, margin=1, min_foreground_fraction=0.0)
    (res,) = preprocess_volume(path, config)
    fg = data[3:27, 3:27, :].astype(np.float64)
    lo, hi = np.percentile(fg, config.clip_percentiles)
    clipped = np.clip(fg, lo, hi)
    z_true = (clipped - clipped.mean()) / clipped.std()
    u = res.slices[res.slices > 0].astype(np.float64)
    assert u.min() == 1 and u.max() == 255
    # Slices are [z, row=anterior→posterior, col=left→right]; gather the same voxels.
    want = np.transpose(clipped[:, ::-1, :], (2, 1, 0))
    top = (32 - 26) // 2 + 1
    u_vol = res.slices[:, top : top + 24, top : top + 24].astype(np.float64)
    z_stored = (u_vol - res.fg_mean) / res.fg_std
    quantum = 254 / (hi - lo) / res.fg_std  # one uint8 step in z units
    np.testing.assert_allclose(z_stored, np.transpose(z_true[:, ::-1, :], (2, 1, 0)), atol=0.51 * quantum)
    np.testing.assert_allclose(1 + 254 * (want - lo) / (hi - lo), u_vol, atol=0.5 + 1e-4)


def test_nan_and_inf_become_background_and_are_counted(tmp_path, blob):
    volume = blob(seed=5).astype(np.float32)
    dirty = volume.copy()
    dirty[0, 0, 0], dirty[1, 2, 3], dirty[12, 14, 10] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(dirty, np.eye(4)), tmp_path / "d.nii.gz")
    clean = volume.copy()
    clean[12, 14, 10] = 0.0
    nib.save(nib.Nifti1Image(clean, np.eye(4)), tmp_path / "c.nii.gz")
    config = PrepConfig(min_extent_mm=0, target_spacing=None, size=48, margin=2)
    (d,) = preprocess_volume(tmp_path / "d.nii.gz", config)
    (c,) = preprocess_volume(tmp_path / "c.nii.gz", config)
    assert d.nan_count == 3 and c.nan_count == 0
    np.testing.assert_array_equal(d.slices, c.slices)
    for method in ("otsu", "percentile"):
        (r,) = preprocess_volume(tmp_path / "d.nii.gz", PrepConfig(min_extent_mm=0, target_spacing=None, size=48, mask_method=method))
        assert r.nan_count == 3 and r.slices.max() == 255


def test_fit_intensity_scale_against_numpy():
    values = np.random.default_rng(6).gamma(2.0, 30.0, 10001).astype(np.float32)
    scale = fit_intensity_scale(values.copy(), (2.0, 98.0))
    lo, hi = np.percentile(values.astype(np.float64), (2.0, 98.0))
    assert (scale.lo, scale.hi) == pytest.approx((lo, hi), rel=1e-6)
    clipped = np.clip(values.astype(np.float64), lo, hi)
    assert scale.fg_mean == pytest.approx(1 + 254 * (clipped.mean() - lo) / (hi - lo), rel=1e-5)
    assert scale.fg_std == pytest.approx(254 * clipped.std() / (hi - lo), rel=1e-5)


@pytest.mark.parametrize(
    "kind", ["integers", "negative_integers", "few_levels", "single_value", "non_integer", "integers_too_wide", "integer_probe_then_fraction"]
)
def test_percentiles_equal_numpy_exactly_on_both_paths(kind):
    rng = np.random.default_rng(8)
    values = {
        "integers": np.round(rng.gamma(2.0, 300.0, 20001)),
        "negative_integers": np.round(rng.normal(-50.0, 400.0, 5000)),
        "few_levels": rng.integers(3, 6, 777).astype(float),
        "single_value": np.array([42.0]),
        "non_integer": rng.gamma(2.0, 300.0, 20001),
        "integers_too_wide": np.concatenate([np.round(rng.normal(0, 100, 999)), [2.0 * MAX_COUNTED_LEVELS]]),
        "integer_probe_then_fraction": np.concatenate([np.arange(5000.0), [0.25]]),
    }[kind].astype(np.float32)
    qs = (0.0, 0.5, 37.3, 99.5, 100.0)
    original = values.copy()
    got = percentiles_inplace(values, qs)
    assert got == tuple(np.percentile(original.astype(np.float64), qs))
    counted = kind in ("integers", "negative_integers", "few_levels", "single_value")
    # The counting path leaves the values in place; the partition reorders them.
    assert np.array_equal(values, original) == counted


def test_slice_selection_threshold_and_uniform_modes():
    fractions = np.array([0.0, 0.01, 0.05, 0.2, 0.5, 0.04, 0.3, 0.06, 0.0])
    np.testing.assert_array_equal(select_slices(fractions, 0.05), [2, 3, 4, 6, 7])
    np.testing.assert_array_equal(select_slices(fractions, 0.05, n_slices=3), [2, 5, 7])
    np.testing.assert_array_equal(select_slices(fractions, 0.05, n_slices=1), [2])
    many = select_slices(fractions, 0.05, n_slices=11)
    assert len(many) == 11 and many[0] == 2 and many[-1] == 7 and np.all(np.diff(many) >= 0)
    assert select_slices(fractions, 0.9).size == 0
    assert select_slices(fractions, 0.0).size == 9


def test_uniform_mode_end_to_end(tmp_path, blob):
    path = tmp_path / "u.nii.gz"
    nib.save(nib.Nifti1Image(blob().astype(np.int16), np.eye(4)), path)
    (res,) = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=None, size=48, n_slices=128))
    assert res.slices.shape == (128, 48, 48) and len(res.slice_indices) == 128
    (thr,) = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=None, size=48))
    assert res.slice_indices[0] == thr.slice_indices[0] and res.slice_indices[-1] == thr.slice_indices[-1]
    assert res.slices_dropped == res.n_slices - len(np.unique(res.slice_indices))


@pytest.mark.parametrize(
    "field,value",
    [("target_spacing", (1.0, 0.0, 1.0)), ("target_spacing", (1.0, 1.0)), ("interpolation", "spline"),
     ("four_d_policy", "last"), ("mask_method", "bet"), ("mask_percentile", 100.0),
     ("clip_percentiles", (99.0, 1.0)), ("min_foreground_fraction", 1.5), ("n_slices", 0),
     ("size", 4), ("margin", -1), ("target_spacing", (1.0, float("nan"), 1.0))],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"PrepConfig.{field}"):
        PrepConfig(**{field: value}).validate()


def test_config_json_round_trip_and_unknown_keys():
    config = PrepConfig(target_spacing=None, n_slices=128, size=224, clip_percentiles=(1.0, 99.0))
    assert PrepConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PrepConfig.from_dict(PrepConfig().to_dict()) == PrepConfig()
    with pytest.raises(ConfigError, match="PrepConfig.sizee"):
        PrepConfig.from_dict({"sizee": 3})


def test_phantom_is_seeded_and_has_every_tissue():
    a = make_phantom(11, spacing=(4.0, 4.0, 4.0))
    b = make_phantom(11, spacing=(4.0, 4.0, 4.0))
    c = make_phantom(12, spacing=(4.0, 4.0, 4.0))
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.labels, c.labels)
    assert set(np.unique(a.labels)) == set(LABELS.values())
    no_lesion = make_phantom(11, spacing=(4.0, 4.0, 4.0), lesions=False)
    assert LABELS["lesion"] not in no_lesion.labels
    # Lesions only replace parenchyma; the rest of the anatomy is unchanged.
    same = a.labels != LABELS["lesion"]
    np.testing.assert_array_equal(a.labels[same], no_lesion.labels[same])


def test_demo_dataset_is_small_bids_and_preprocesses(tmp_path):
    paths = write_demo_dataset(tmp_path / "demo", n_volumes=4, label_dir=tmp_path / "labels")
    assert [p.name for p in paths] == ["sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1_T2w.nii.gz",
                                       "sub-01_ses-1_FLAIR.nii.gz", "sub-01_ses-1_T1w.nii.gz"]
    assert {p.parts[-5] for p in paths} == {"demo-a", "demo-b"}
    assert len(list((tmp_path / "labels").rglob("*_dseg.nii.gz"))) == 4
    assert not list((tmp_path / "demo").rglob("*_dseg*"))
    (res,) = preprocess_volume(paths[0], PrepConfig(size=224))
    assert res.slices.shape[1:] == (224, 224) and len(res.slices) > 50 and res.spacing == pytest.approx((1, 1, 1))
