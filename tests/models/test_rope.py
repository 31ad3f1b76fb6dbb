"""RoPE against a float64 numpy transcription of DINOv3's RopePositionEmbedding equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braindino_jax.models.config import ViTConfig
from braindino_jax.models.rope import RopeEmbedding, apply_rope, rope_coords, rope_periods, rope_sin_cos


def reference_sin_cos(h, w, head_dim, base=100.0):
    """float64: coords (i+0.5)/H -> [-1, 1]; angles 2*pi*c/period; [rows, cols] then tiled twice."""
    periods = base ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
    rows, cols = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    coords = 2 * np.stack([rows.ravel(), cols.ravel()], -1) - 1
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = np.tile(angles.reshape(len(coords), -1), 2)
    return np.sin(angles), np.cos(angles)


@pytest.mark.parametrize("h,w", [(14, 14), (6, 6), (3, 5)])
def test_sin_cos_match_reference(h, w):
    sin, cos = rope_sin_cos(rope_coords(h, w), jnp.asarray(rope_periods(32)))
    ref_sin, ref_cos = reference_sin_cos(h, w, 32)
    np.testing.assert_allclose(sin, ref_sin, atol=2e-5)
    np.testing.assert_allclose(cos, ref_cos, atol=2e-5)


def test_coords_span_minus_one_to_one():
    c = np.asarray(rope_coords(2, 4))
    np.testing.assert_allclose(c[:, 0], [-0.5] * 4 + [0.5] * 4)
    np.testing.assert_allclose(c[:4, 1], [-0.75, -0.25, 0.25, 0.75])


def test_attention_scores_depend_only_on_relative_position():
    """<R(p) q, R(p') k> is a function of p - p' (same grid, so same normalisation)."""
    sin, cos = rope_sin_cos(rope_coords(4, 4), jnp.asarray(rope_periods(16)))
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    rq = apply_rope(jnp.broadcast_to(q, (1, 16, 1, 16)), sin, cos)[0, :, 0]
    rk = apply_rope(jnp.broadcast_to(k, (1, 16, 1, 16)), sin, cos)[0, :, 0]
    scores = np.asarray(rq @ rk.T)
    # positions (0,0)-(1,2) and (2,1)-(3,3) share the offset (1, 2)
    np.testing.assert_allclose(scores[0 * 4 + 0, 1 * 4 + 2], scores[2 * 4 + 1, 3 * 4 + 3], rtol=1e-4)
    # the rotation preserves norms
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)


def test_augmentations_off_by_default_and_on_with_key():
    plain = RopeEmbedding(ViTConfig(embed_dim=64, depth=1, num_heads=4))
    s0, _ = plain(3, 3)
    s1, _ = plain(3, 3, jax.random.key(0))
    np.testing.assert_array_equal(s0, s1)  # no augmentation configured: key ignored
    aug = RopeEmbedding(ViTConfig(embed_dim=64, depth=1, num_heads=4, rope_rescale_coords=2.0))
    sa, _ = aug(3, 3, jax.random.key(0))
    assert not np.allclose(sa, s0)
    np.testing.assert_array_equal(aug(3, 3)[0], s0)  # without a key (eval) the grid is exact
