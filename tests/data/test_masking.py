"""Block-mask generator: determinism, DINOv3's mask counts and mask shapes, block shapes."""

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage

from braindino_jax.data import masking

GRID = (14, 14)
N = GRID[0] * GRID[1]
# Masks from DINOv3's MaskingGenerator + collate_data_and_cast (tools/make_dinov3_masks_fixture.py).
DINOV3_MASKS = Path(__file__).parents[1] / "fixtures" / "dinov3_masks.npz"


def test_deterministic_given_seed():
    a = masking.sample_masks(np.random.default_rng(7), 32, GRID)
    b = masking.sample_masks(np.random.default_rng(7), 32, GRID)
    c = masking.sample_masks(np.random.default_rng(8), 32, GRID)
    assert a.dtype == np.bool_ and a.shape == (32, N)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("batch_size,prob", [(32, 0.5), (10, 0.3), (5, 1.0), (4, 0.0)])
def test_fraction_of_masked_samples_and_exact_count(batch_size, prob):
    rng = np.random.default_rng(0)
    bound = masking.max_masked_tokens(batch_size, GRID, prob)
    for _ in range(50):
        masks = masking.sample_masks(rng, batch_size, GRID, prob)
        # Ratios start at 0.1 (19 patches), so every selected sample gets at least one block.
        assert (masks.sum(axis=1) > 0).sum() == int(batch_size * prob)
        # Every batch fills the iBOT buffer exactly (the bound is 1 when nothing is masked).
        assert masks.sum() == (bound if prob * batch_size >= 1 else 0)


def test_each_masked_sample_gets_the_upper_end_of_its_stratum():
    """DINOv3's counts: int(N * edges[i + 1]), exactly, whatever the rectangles managed."""
    rng = np.random.default_rng(1)
    batch_size = 16
    edges = np.linspace(0.1, 0.5, batch_size // 2 + 1)
    want = [int(N * e) for e in edges[1:]]
    assert masking.mask_counts(batch_size, GRID) == want
    for _ in range(200):
        counts = masking.sample_masks(rng, batch_size, GRID).sum(axis=1)
        np.testing.assert_array_equal(np.sort(counts[counts > 0]), want)


def _largest_component_aspect(mask: np.ndarray) -> float:
    labels, _ = scipy.ndimage.label(mask)
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return abs(math.log(largest.any(axis=1).sum() / largest.any(axis=0).sum()))


def _mask_shape_statistics(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per masked sample: connected 4-components, isolated patches, |log aspect| of the
    largest component's bounding box; and the row/column coverage profiles."""
    masks = masks.reshape(-1, *GRID)
    masks = masks[masks.any(axis=(1, 2))]
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    neighbours = (padded[:, :-2, 1:-1].astype(int) + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2]
                  + padded[:, 1:-1, 2:])
    return {
        "components": np.array([scipy.ndimage.label(m)[1] for m in masks], float),
        "isolated": (masks & (neighbours == 0)).sum(axis=(1, 2)).astype(float),
        "aspect": np.array([_largest_component_aspect(m) for m in masks]),
        "rows": masks.mean(axis=2), "cols": masks.mean(axis=1),
    }


@pytest.mark.parametrize("crops", [16, 10])
def test_masks_match_dinov3(crops):
    """Same counts per batch as DINOv3's collate, and masks of the same shape statistics."""
    reference = np.load(DINOV3_MASKS)
    assert tuple(reference["grid"]) == GRID
    ref = np.unpackbits(reference[f"b{crops}/masks"], axis=-1, count=N).astype(bool)
    assert masking.max_masked_tokens(crops, GRID) == int(reference[f"b{crops}/upperbound"])
    rng = np.random.default_rng(2)
    ours = np.stack([masking.sample_masks(rng, crops, GRID) for _ in range(4 * len(ref))])
    for batch in (ref, ours[:len(ref)]):  # [batches, crops, N]
        assert (batch.any(axis=-1).sum(axis=-1) == crops // 2).all()
    np.testing.assert_array_equal(np.sort(ref.sum(-1), axis=-1)[0],
                                  np.sort(ours.sum(-1), axis=-1)[0])
    assert (np.sort(ref.sum(-1), axis=-1) == np.sort(ref.sum(-1), axis=-1)[0]).all()

    a, b = _mask_shape_statistics(ref), _mask_shape_statistics(ours)
    for name in a:  # two-sample z-tests on the means, 4 standard errors
        se = np.sqrt(a[name].var(axis=0) / len(a[name]) + b[name].var(axis=0) / len(b[name]))
        diff = np.abs(a[name].mean(axis=0) - b[name].mean(axis=0))
        assert np.all(diff <= 4 * se + 1e-9), (name, diff, se)


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


def test_top_up_fills_what_rectangles_cannot():
    """A count no rectangle can reach exactly (prime, above half the grid) is still exact."""
    rng = np.random.default_rng(6)
    for n_target in (0, 1, 3, 97, 131, N):
        mask = masking.sample_block_mask(rng, GRID, n_target)
        assert mask.shape == GRID and mask.sum() == n_target
    with pytest.raises(ValueError, match="n_target"):
        masking.sample_block_mask(rng, GRID, N + 1)


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

