"""Block-mask generator: determinism, the stratified ratio distribution, block shapes."""

import math

import numpy as np
import pytest

from braindino_jax.data import masking

GRID = (14, 14)
N = GRID[0] * GRID[1]


def test_deterministic_given_seed():
    a = masking.sample_masks(np.random.default_rng(7), 32, GRID)
    b = masking.sample_masks(np.random.default_rng(7), 32, GRID)
    c = masking.sample_masks(np.random.default_rng(8), 32, GRID)
    assert a.dtype == np.bool_ and a.shape == (32, N)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("batch_size,prob", [(32, 0.5), (10, 0.3), (5, 1.0), (4, 0.0)])
def test_fraction_of_masked_samples_and_upper_bound(batch_size, prob):
    rng = np.random.default_rng(0)
    bound = masking.max_masked_tokens(batch_size, GRID, prob)
    for _ in range(50):
        masks = masking.sample_masks(rng, batch_size, GRID, prob)
        # Ratios start at 0.1 (19 patches), so every selected sample gets at least one block.
        assert (masks.sum(axis=1) > 0).sum() == int(batch_size * prob)
        assert masks.sum() <= bound


def test_counts_stay_in_their_stratified_intervals():
    """Sorted per-sample counts sit in the sorted sub-intervals of [0.1, 0.5].

    Counts never exceed the sampled target, and fall at most a few patches short of it (when
    no rectangle fits the last remainder).
    """
    rng = np.random.default_rng(1)
    batch_size = 16
    edges = np.linspace(0.1, 0.5, batch_size // 2 + 1)
    low = np.array([int(N * e) for e in edges[:-1]])
    high = np.array([int(N * e) for e in edges[1:]])
    for _ in range(200):
        counts = masking.sample_masks(rng, batch_size, GRID).sum(axis=1)
        counts = np.sort(counts[counts > 0])
        assert np.all(counts <= high)
        assert np.all(counts >= low - 3)


def test_ratios_follow_uniform_range_over_many_draws():
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(300):
        counts = masking.sample_masks(rng, 8, GRID, 0.5, (0.1, 0.5)).sum(axis=1)
        ratios.extend(counts[counts > 0] / N)
    ratios = np.sort(np.array(ratios))
    # Targets are int(N * U(0.1, 0.5)): mean 0.3 minus half a patch of flooring.
    assert abs(ratios.mean() - (0.3 - 0.5 / N)) < 0.01
    # Kolmogorov-Smirnov distance to U(0.1, 0.5), loosened by the one-patch quantisation.
    cdf = np.clip((ratios - 0.1) / 0.4, 0.0, 1.0)
    empirical = np.arange(1, ratios.size + 1) / ratios.size
    assert np.max(np.abs(empirical - cdf)) < 0.04


def _reference_block_shapes(rng, n, max_new, grid):
    """(h, w) of single accepted rectangles, drawn from the generator's stated equations."""
    area = rng.uniform(masking.MIN_BLOCK_PATCHES, max_new, size=n)
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), size=n))
    h = np.floor(np.sqrt(area * aspect) + 0.5).astype(int)
    w = np.floor(np.sqrt(area / aspect) + 0.5).astype(int)
    ok = (h < grid[0]) & (w < grid[1]) & (h * w <= max_new)
    return h[ok], w[ok]


def test_single_block_shapes_follow_configured_distribution():
    rng = np.random.default_rng(3)
    max_new = N // 2
    heights, widths = [], []
    for _ in range(3000):
        mask = np.zeros(GRID, dtype=bool)
        added = masking.add_random_block(rng, mask, max_new)
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert added == mask.sum() == h * w  # a solid rectangle
        heights.append(h)
        widths.append(w)
    heights, widths = np.array(heights), np.array(widths)
    ref_h, ref_w = _reference_block_shapes(np.random.default_rng(4), 200_000, max_new, GRID)
    log_ratio = np.log(heights / widths)
    ref_log_ratio = np.log(ref_h / ref_w)
    assert abs(log_ratio.mean()) < 0.05  # symmetric aspect ratios
    assert abs(log_ratio.std() - ref_log_ratio.std()) < 0.05
    assert abs((heights * widths).mean() - (ref_h * ref_w).mean()) < 1.5
    for q in (10, 50, 90):
        assert abs(np.percentile(heights * widths, q) - np.percentile(ref_h * ref_w, q)) <= 4
    # Aspect ratios stay within [0.3, 1/0.3] up to rounding of the side lengths: a side of 1
    # needs area/aspect < 1.5², so the other side is < 1.5 / 0.3 + 0.5, i.e. at most 5.
    assert np.all(np.abs(log_ratio) <= math.log(5.0) + 1e-9)
    assert np.mean(np.abs(log_ratio) <= math.log(1 / 0.3)) > 0.9


def test_blocks_reach_every_position():
    rng = np.random.default_rng(5)
    coverage = sum(masking.sample_masks(rng, 8, GRID).sum(axis=0) for _ in range(200))
    assert np.all(coverage > 0)


@pytest.mark.parametrize("kwargs,field", [
    (dict(batch_size=0), "batch_size"),
    (dict(grid=(14, 0)), "grid"),
    (dict(mask_sample_probability=1.5), "mask_sample_probability"),
    (dict(mask_ratio_range=(0.6, 0.5)), "mask_ratio_range"),
])
def test_bad_settings_name_the_field(kwargs, field):
    args = dict(batch_size=4, grid=GRID) | kwargs
    with pytest.raises(ValueError, match=field):
        masking.sample_masks(np.random.default_rng(0), **args)
    with pytest.raises(ValueError, match=field):
        masking.max_masked_tokens(**args)

