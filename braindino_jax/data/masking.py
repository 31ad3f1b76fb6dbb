"""Block-wise patch masks for the iBOT objective, with DINOv3's per-sample mask counts.

A mask is built from random rectangles of patches, each with an aspect ratio in
[0.3, 1/0.3] and an area of at least 4 patches, added until no further rectangle fits the
sample's count (never more), as DINOv3's ``MaskingGenerator``. Only a fraction of the samples
in a batch are masked. Their counts are stratified as in DINOv3's ``collate_data_and_cast``:
with ``n`` masked samples and edges ``linspace(low, high, n + 1)``, masked sample ``i`` gets
exactly ``int(N * edges[i + 1])`` patches, the upper end of its sub-interval; what the
rectangles leave short is topped up with patches drawn uniformly at random from the unmasked
ones (DINOv3's ``complete_mask_randomly``). The masks are then shuffled across the batch.

This is DINOv3's rule, not DINOv2's (which draws each count uniformly within its
sub-interval and does not top up). MRI gives no reason to differ, and it makes the count
exact: every batch masks precisely :func:`max_masked_tokens` patches, so the iBOT loss's
fixed-size gather buffer is always full, and each stratum keeps a fixed weight.
The top-up is rare: about 0.1% of the masked patches on a 14 x 14 grid.

Everything runs in numpy on the host and is deterministic given the ``np.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np

MIN_BLOCK_PATCHES = 4
ASPECT_RATIO_RANGE = (0.3, 1 / 0.3)
# A single rectangle covers at most this fraction of the grid (DINOv2 uses half the patches).
MAX_BLOCK_FRACTION = 0.5
# Placement attempts per rectangle before giving up on reaching the target count.
MAX_ATTEMPTS = 10


def _validate(batch_size: int, grid: tuple[int, int], mask_sample_probability: float,
              mask_ratio_range: tuple[float, float]) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if len(grid) != 2 or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid: must be two positive integers (grid_h, grid_w), got {grid!r}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(
            f"mask_sample_probability: must lie in [0, 1], got {mask_sample_probability!r}")
    if len(mask_ratio_range) != 2:
        raise ValueError(f"mask_ratio_range: must be (low, high), got {mask_ratio_range!r}")
    low, high = mask_ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            f"mask_ratio_range: need 0 <= low <= high <= 1, got {mask_ratio_range!r}")


def ratio_edges(batch_size: int, mask_sample_probability: float,
                mask_ratio_range: tuple[float, float]) -> np.ndarray:
    """Edges of the stratified ratio sub-intervals, one interval per masked sample."""
    n_masked = int(batch_size * mask_sample_probability)
    return np.linspace(mask_ratio_range[0], mask_ratio_range[1], n_masked + 1)


def add_random_block(rng: np.random.Generator, mask: np.ndarray, max_new: int) -> int:
    """Mask one random rectangle in ``mask`` (in place) that adds 1..``max_new`` new patches.

    The target area is uniform between ``MIN_BLOCK_PATCHES`` and ``max_new``, the log aspect
    ratio uniform over ``ASPECT_RATIO_RANGE``; height and width are the rounded square roots
    of area·aspect and area/aspect. Rectangles that do not fit strictly inside the grid or that
    would add too many patches are redrawn, up to ``MAX_ATTEMPTS`` times. Returns the number of
    newly masked patches (0 if no attempt fit).
    """
    grid_h, grid_w = mask.shape
    log_aspect = (math.log(ASPECT_RATIO_RANGE[0]), math.log(ASPECT_RATIO_RANGE[1]))
    area_range = sorted((MIN_BLOCK_PATCHES, max_new))
    for _ in range(MAX_ATTEMPTS):
        area = rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h < grid_h and 0 < w < grid_w):  # strict, as in the reference generators
            continue
        top = int(rng.integers(0, grid_h - h + 1))
        left = int(rng.integers(0, grid_w - w + 1))
        window = mask[top:top + h, left:left + w]
        new = h * w - int(window.sum())
        if 0 < new <= max_new:
            window[...] = True
            return new
    return 0


def sample_block_mask(rng: np.random.Generator, grid: tuple[int, int], n_target: int) -> np.ndarray:
    """One bool mask [grid_h, grid_w] with exactly ``n_target`` patches masked.

    Rectangles are added while one fits the remainder (``MAX_ATTEMPTS`` draws each); the last
    few patches (fewer than 4 left, or no rectangle found) are drawn uniformly at random from
    the unmasked ones, as DINOv3's ``complete_mask_randomly``.
    """
    grid_h, grid_w = grid
    if not 0 <= n_target <= grid_h * grid_w:
        raise ValueError(f"n_target: must be in [0, {grid_h * grid_w}], got {n_target}")
    mask = np.zeros((grid_h, grid_w), dtype=bool)
    max_block = int(MAX_BLOCK_FRACTION * grid_h * grid_w)
    count = 0
    while count < n_target:
        added = add_random_block(rng, mask, min(n_target - count, max_block))
        if added == 0:
            break
        count += added
    if count < n_target:  # rare (about 0.1% of the patches): skip the draw otherwise
        flat = mask.reshape(-1)
        flat[rng.choice(np.flatnonzero(~flat), size=n_target - count, replace=False)] = True
    return mask


def sample_masks(rng: np.random.Generator, batch_size: int, grid: tuple[int, int],
                 mask_sample_probability: float = 0.5,
                 mask_ratio_range: tuple[float, float] = (0.1, 0.5)) -> np.ndarray:
    """Masks for one batch of global crops: bool [batch_size, grid_h * grid_w], row-major.

    ``int(batch_size * mask_sample_probability)`` samples are masked, sample ``i`` of them with
    exactly ``int(N * edges[i + 1])`` patches over the stratified ratio range; the other samples
    are all False. Row order is shuffled so masked samples land anywhere in the batch.
    """
    _validate(batch_size, grid, mask_sample_probability, mask_ratio_range)
    grid = (int(grid[0]), int(grid[1]))
    masks = np.zeros((batch_size, grid[0] * grid[1]), dtype=bool)
    for i, n_target in enumerate(mask_counts(batch_size, grid, mask_sample_probability,
                                             mask_ratio_range)):
        masks[i] = sample_block_mask(rng, grid, n_target).reshape(-1)
    return masks[rng.permutation(batch_size)]


def mask_counts(batch_size: int, grid: tuple[int, int], mask_sample_probability: float = 0.5,
                mask_ratio_range: tuple[float, float] = (0.1, 0.5)) -> list[int]:
    """Masked patches of each masked sample of a batch, ``int(N * edges[i + 1])`` (DINOv3)."""
    _validate(batch_size, grid, mask_sample_probability, mask_ratio_range)
    n_patches = int(grid[0]) * int(grid[1])
    edges = ratio_edges(batch_size, mask_sample_probability, mask_ratio_range)
    return [int(n_patches * e) for e in edges[1:]]


def max_masked_tokens(batch_size: int, grid: tuple[int, int], mask_sample_probability: float = 0.5,
                      mask_ratio_range: tuple[float, float] = (0.1, 0.5)) -> int:
    """Static size of the iBOT masked-token buffer for these settings (at least 1).

    Every batch from ``sample_masks`` masks exactly ``sum(mask_counts(...))`` patches (DINOv3's
    ``upperbound``), so this is both the exact count and a static upper bound.
    """
    return max(1, sum(mask_counts(batch_size, grid, mask_sample_probability, mask_ratio_range)))
