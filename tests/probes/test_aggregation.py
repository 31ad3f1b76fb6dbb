"""BrainDINO's volume protocol by default (128 slices between the first and last foreground
slice, 224 px, CLS mean-pooled), and the pooling and modality-fusion options against numpy."""

import dataclasses

import numpy as np
import pytest

from braindino_jax.preprocessing.volume import preprocess_volume
from braindino_jax.probes.aggregation import fuse_modalities, pool_slices, row_inputs, slice_tokens
from braindino_jax.probes.config import default_config, prep_config
from braindino_jax.probes.volumes import read_probe_volume


def test_defaults_are_braindinos_128_slices_of_224_px_between_the_foreground_ends(phantom_csv):
    c = default_config()
    assert (c.input.n_slices, c.input.size, c.input.image_size) == (128, 224, 224)
    assert (c.features.token, c.features.pooling, c.heads) == ("cls", "mean", ("mlp",))
    assert tuple(c.knn.ks) == (1, 3, 5, 10, 20, 50)
    c.input.target_spacing = (3.0, 3.0, 3.0)  # a cheap grid; everything else as configured by default
    prep = prep_config(c)
    assert (prep.n_slices, prep.size) == (128, 224)
    path = phantom_csv.parent / "images" / "sub-002_FLAIR.nii.gz"
    volume = read_probe_volume(path, prep)
    assert volume.pixels.shape == (128, 224, 224) and volume.pixels.dtype == np.uint8
    # Threshold mode keeps every slice with enough foreground: its ends are the first and last
    # foreground slice, and the 128 probe slices are spread uniformly between them.
    kept = preprocess_volume(path, dataclasses.replace(prep, n_slices=None))[0].slice_indices
    expected = np.floor(np.linspace(kept.min(), kept.max(), 128) + 0.5).astype(int)  # nearest slice
    np.testing.assert_array_equal(volume.slice_indices, expected)
    assert len(kept) < 128  # at 3 mm: slices repeat rather than invent new ones


def test_pooling_and_modality_fusion():
    rng = np.random.default_rng(0)
    t1 = {"cls": rng.normal(size=(5, 3)).astype(np.float32), "patch_mean": rng.normal(size=(5, 3)).astype(np.float32)}
    flair = {k: v + 10 for k, v in t1.items()}
    np.testing.assert_array_equal(slice_tokens(t1, "cls+patch_mean"), np.concatenate([t1["cls"], t1["patch_mean"]], 1))
    np.testing.assert_allclose(row_inputs([t1], "cls", "mean", "average"), t1["cls"].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(row_inputs([t1], "patch_mean", "max", "average"), t1["patch_mean"].max(0))
    averaged = row_inputs([t1, flair], "cls", "mean", "average")
    np.testing.assert_allclose(averaged, t1["cls"].mean(0) + 5, rtol=1e-5)
    concat = row_inputs([t1, flair], "cls", "max", "concat")
    np.testing.assert_allclose(concat, np.concatenate([t1["cls"].max(0), flair["cls"].max(0)]), rtol=1e-6)
    slices = row_inputs([t1, flair], "cls+patch_mean", "attention", "concat")  # pooled by the head
    assert slices.shape == (2, 5, 6)
    assert fuse_modalities(pool_slices(slices, "mean"), "concat").shape == (12,)
    with pytest.raises(ValueError, match="pooling"):
        pool_slices(slices, "median")
