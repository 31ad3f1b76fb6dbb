"""Feature pictures: the PCA map covers the foreground only, similarity maps are cosines to the
reference patch, and t-SNE colours volumes by label."""

import numpy as np
from sklearn.decomposition import PCA

from braindino_jax.probes import visualize


def test_pca_map_is_foreground_only_and_separates_tissue():
    pixels = np.zeros((2, 32, 32), np.uint8)
    pixels[:, 8:24, 8:24] = 100  # a 2 x 2 patch square of "brain" in a 4 x 4 grid of 8 px patches
    pixels[0, 8:12, 8:16] = 0  # patch (1, 1) of slice 0 is half brain: kept (>= 50%)
    pixels[1, 8:13, 0:3] = 100  # 15 of 64 pixels of patch (1, 0): under half, background
    foreground = visualize.patch_foreground(pixels, 4)
    expected = np.zeros((2, 4, 4), bool)
    expected[:, 1:3, 1:3] = True
    np.testing.assert_array_equal(foreground, expected)

    rng = np.random.default_rng(0)
    patches = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
    patches[:, 1:3, 1] += 5.0 * np.eye(16)[0]  # two "tissues" inside the brain
    patches[~foreground] += 100.0  # background far away: it must not shape the components
    rgb = visualize.pca_rgb(patches, foreground)
    assert rgb.shape == (2, 4, 4, 3) and np.all(rgb[~foreground] == 0)
    assert rgb.min() >= 0 and rgb.max() <= 1
    # The first component is the foreground's own: PCA of the foreground patches alone.
    first = PCA(3, random_state=0).fit_transform(patches[foreground].astype(np.float64))[:, 0]
    red = rgb[foreground][:, 0]
    assert abs(np.corrcoef(first, red)[0, 1]) > 0.95
    assert abs(red[patches[foreground][:, 0] > 2.5].mean() - red[patches[foreground][:, 0] < 2.5].mean()) > 0.5


def test_similarity_maps_and_reference_patch(tmp_path):
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(3, 4, 4, 8))
    patches[2, 0, 0] = 2.5 * patches[0, 1, 2]  # the same direction on another slice
    sims = visualize.cosine_similarity_maps(patches, patches[0, 1, 2])
    assert abs(sims[0, 1, 2] - 1) < 1e-12 and abs(sims[2, 0, 0] - 1) < 1e-12 and np.all(np.abs(sims) <= 1 + 1e-12)
    a, b = patches[1, 3, 3], patches[0, 1, 2]
    assert abs(sims[1, 3, 3] - a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 1e-12
    mask = np.zeros((4, 4), bool)
    mask[2:4, 1:3] = True
    assert visualize.central_patch(mask) in {(2, 1), (2, 2), (3, 1), (3, 2)}
    pixels = np.full((3, 32, 32), 50, np.uint8)
    visualize.plot_similarity(pixels, patches, (0, 1, 2), tmp_path / "sim.png", "test")
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"


def test_tsne_writes_a_figure_coloured_by_label(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 8)
    features = rng.normal(size=(16, 5)) + 4 * labels[:, None]
    assert visualize.plot_tsne(features, labels, tmp_path / "tsne.png", "test", ("a", "b"))
    assert (tmp_path / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    assert not visualize.plot_tsne(features[:4], labels[:4], tmp_path / "few.png", "test")
    assert not (tmp_path / "few.png").exists()
