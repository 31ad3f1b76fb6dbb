"""Feature extraction: the probe input convention, sharding, the cache, real files, failures,
worker processes, and label maps framed like their images."""

import os
import shutil

import jax
import numpy as np
import pytest
from nibabel.testing import data_path

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.probes.cache import FeatureCache
from braindino_jax.probes.encoders import load_encoder
from braindino_jax.probes.errors import ProbeConfigError
from braindino_jax.probes.features import (
    ExtractionSettings,
    FeatureExtractor,
    VolumeJob,
    extract_features,
    probe_images,
)
from braindino_jax.probes.volumes import read_probe_volume

PREP = PrepConfig(target_spacing=(3.0, 3.0, 3.0), n_slices=8, size=64)


@pytest.fixture(scope="module")
def encoder(tiny_arch):
    return load_encoder(f"random:{tiny_arch}")


@pytest.fixture(scope="module")
def volumes(phantom_csv):
    images = sorted((phantom_csv.parent / "images").glob("*_T1w.nii.gz"))
    return [str(p) for p in images[:4]]


def test_probe_images_apply_the_foreground_z_score_with_background_zero():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 32, 32)).astype(np.uint8)
    pixels[:, :4] = 0
    mean, std = np.array([100.0, 120.0, 90.0]), np.array([30.0, 20.0, 25.0])
    images = np.asarray(probe_images(pixels, mean, std, 32, 3))
    expected = np.where(pixels > 0, (pixels - mean[:, None, None]) / std[:, None, None], 0.0)
    assert images.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(images[..., 0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    # Resampled to another size: a uniform foreground stays uniform to its edge (the
    # resampled mask normalises the intensity), and the background stays exactly 0.
    flat = np.zeros((1, 64, 64), np.uint8)
    flat[:, 16:48, 8:56] = 200
    small = np.asarray(probe_images(flat, np.array([150.0]), np.array([25.0]), 32, 1))[0, ..., 0]
    inside = small[8:24, 4:28]
    np.testing.assert_allclose(inside, 2.0, rtol=1e-5)
    assert np.all(small[:7] == 0) and np.all(small[25:] == 0)
    assert set(np.unique(small).round(4)) <= {0.0, 2.0}


def test_sharded_extraction_matches_one_device_and_pads_the_last_batch(encoder, volumes):
    assert jax.device_count() == 8
    settings = ExtractionSettings(PREP, 64, layers=(1,), batch_size=12)
    eight = FeatureExtractor(encoder, settings)
    one = FeatureExtractor(encoder, settings, devices=jax.devices()[:1])
    assert eight.batch_size == 16 and one.batch_size == 12
    volume = read_probe_volume(volumes[0], PREP)
    out = eight.dispatch(volume.pixels[:5], np.full(5, volume.fg_mean), np.full(5, volume.fg_std))
    assert len(out["cls"].sharding.device_set) == 8 and out["cls"].shape == (16, 64)
    assert out["cls"].addressable_shards[0].data.shape == (2, 64)
    # Data parallel with replicated parameters: the compiled program moves nothing between devices.
    pixels = np.zeros((16, 64, 64), np.uint8)
    args = jax.device_put((pixels, np.zeros(16, np.float32), np.ones(16, np.float32)), eight._inputs)
    hlo = eight._forward.lower(eight._state, *args).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
    a, b = eight.embed(volume), one.embed(volume)
    assert a["cls"].shape == (8, 64) and a["patch_1"].shape == (8, 4, 4, 64) and a["patch_1"].dtype == np.float16
    for key in a:
        np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), rtol=2e-3, atol=2e-3)
    # Block 1 is the last: its final-normed patch map averages to the mean patch token.
    np.testing.assert_allclose(a["patch_mean"], a["patch_1"].astype(np.float32).mean(axis=(1, 2)), atol=2e-3)


def test_cache_is_hit_on_the_second_run_with_no_forward_passes(encoder, volumes, tmp_path):
    settings = ExtractionSettings(PREP, 64, batch_size=12)
    jobs = [VolumeJob(p) for p in volumes]
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(encoder, jobs, settings, cache)
    assert first.stats["forward_passes"] == 2 and cache.misses == 4 and cache.hits == 0  # 32 slices / 16
    second = extract_features(encoder, jobs, settings, cache)
    assert second.stats["forward_passes"] == 0 and second.stats["cache_hits"] == 4 and cache.hits == 4
    for job in jobs:
        for key, value in first.features[job].items():
            np.testing.assert_array_equal(second.features[job][key], value)
    # Another preprocessing setting, another encoder or an edited file: a miss, never stale.
    assert extract_features(encoder, jobs[:1], ExtractionSettings(PREP, 32, batch_size=12), cache).stats["forward_passes"] == 1
    other = load_encoder(f"random:{encoder.spec.split(':', 1)[1]}@9")
    assert extract_features(other, jobs[:1], settings, cache).stats["cache_hits"] == 0
    copy = tmp_path / "copy.nii.gz"
    shutil.copy(volumes[0], copy)
    assert extract_features(encoder, [VolumeJob(str(copy))], settings, cache).stats["cache_hits"] == 1  # same bytes
    write_phantom(copy, 999, spacing=(3.0, 3.0, 3.0), skull_stripped=True)
    assert extract_features(encoder, [VolumeJob(str(copy))], settings, cache).stats["cache_hits"] == 0


def test_nibabel_test_volumes_go_through_extraction_and_bad_files_are_reported(encoder, tmp_path):
    names = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii",
             "reoriented_anat_moved.nii", "standard.nii.gz"]
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(open(os.path.join(data_path, "example4d.nii.gz"), "rb").read()[:5000])
    jobs = [VolumeJob(os.path.join(data_path, n)) for n in names]
    jobs += [VolumeJob(os.path.join(data_path, "analyze.hdr")), VolumeJob(str(truncated)),
             VolumeJob(str(tmp_path / "gone.nii.gz"))]
    # These test volumes are not brains: some have a field of view under the 60 mm default, and
    # standard.nii.gz has 3 mm coronal slices (3x upsampling to axial).
    prep = PrepConfig(n_slices=8, size=32, min_foreground_fraction=0.01, mask_method="otsu",
                      min_extent_mm=0.0, max_slice_upsampling=3.0)
    result = extract_features(encoder, jobs, ExtractionSettings(prep, 32, batch_size=16))
    assert set(result.features) == set(jobs[:6])
    for job in jobs[:6]:
        f = result.features[job]
        assert f["cls"].shape == (8, 64) and np.all(np.isfinite(f["cls"])) and np.all(np.isfinite(f["patch_mean"]))
        np.testing.assert_array_equal(f["slice_indices"], read_probe_volume(job.path, prep).slice_indices)
        assert np.all(np.diff(f["slice_indices"]) >= 0)
    assert set(result.failures) == set(jobs[6:])
    assert "analyze.img does not exist" in result.failures[jobs[6]]
    assert result.failures[jobs[7]].startswith(str(truncated))
    assert result.failures[jobs[8]] == f"{tmp_path / 'gone.nii.gz'}: No such file or directory"
    assert result.stats["volumes"] == 9 and result.stats["embedded"] == 6 and result.stats["failed"] == 3
    small = VolumeJob(os.path.join(data_path, "standard.nii.gz"))
    default = ExtractionSettings(PrepConfig(n_slices=8, size=32, mask_method="otsu"), 32, batch_size=16)
    assert "max_slice_upsampling" in extract_features(encoder, [small], default).failures[small]


def test_worker_processes_give_the_same_features(encoder, volumes):
    settings = ExtractionSettings(PREP, 64, batch_size=12)
    jobs = [VolumeJob(p) for p in volumes[:3]]
    inline = extract_features(encoder, jobs, settings, workers=0)
    pooled = extract_features(encoder, jobs, settings, workers=1)
    for job in jobs:
        np.testing.assert_array_equal(inline.features[job]["cls"], pooled.features[job]["cls"])
    assert pooled.stats["preprocess_s"] > 0 and pooled.stats["embedded"] == 3


def test_encoder_config_mismatch_names_the_field(encoder):
    with pytest.raises(ProbeConfigError, match=r"config.input.image_size: 60 is not a multiple of .*patch_size 16"):
        FeatureExtractor(encoder, ExtractionSettings(PREP, 60))
    with pytest.raises(ProbeConfigError, match=r"config.segmentation.layers: block 5 does not exist .*depth 2"):
        FeatureExtractor(encoder, ExtractionSettings(PREP, 64, layers=(5,)))


@pytest.mark.parametrize("geometry", [
    dict(spacing=(3.0, 3.0, 3.0), orientation="LPS"),
    dict(spacing=(2.5, 2.5, 4.0), orientation="PIR", oblique_deg=12.0),
])
def test_label_maps_are_framed_pixel_for_pixel_like_their_images(tmp_path, geometry):
    image, labels = write_phantom(tmp_path / "img.nii.gz", 5, label_path=tmp_path / "lab.nii.gz",
                                  skull_stripped=True, **geometry)
    for prep in (PrepConfig(target_spacing=(2.0, 2.0, 2.0), n_slices=8, size=96),
                 PrepConfig(target_spacing=(2.0, 2.0, 2.0), n_slices=8, size=48)):  # the second shrinks
        volume = read_probe_volume(image, prep, labels)
        assert volume.labels.shape == volume.pixels.shape
        brain = np.isin(volume.labels, [4, 5, 6, 7])  # parenchyma and ventricles
        assert np.mean(volume.pixels[brain] > 0) > 0.97
    other = tmp_path / "other.nii.gz"
    write_phantom(other, 5, spacing=(2.0, 2.0, 2.0), skull_stripped=True)
    with pytest.raises(VolumeError, match="label map grid .* does not match the image") as err:
        read_probe_volume(other, PREP, labels)
    assert err.value.path == str(labels)
