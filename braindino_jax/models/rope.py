"""2D axial rotary position embedding, numerically as in DINOv3.

Patch centres are placed at ((i + 0.5) / H, (j + 0.5) / W) and mapped to [-1, 1], so any grid
(14x14 global crops, 6x6 local crops, 32x32 high-resolution crops) uses the same weights without
interpolation. A head of size D gets D/4 frequencies per axis; as in DINOv3's
``angles.flatten(1, 2).tile(2)`` the angle layout over the head is
[rows (D/4), cols (D/4), rows (D/4), cols (D/4)], paired with the "rotate half" convention
x -> [-x2, x1]. Prefix tokens (CLS, storage) are not rotated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from braindino_jax.models.config import ViTConfig


class RopePeriods(nnx.Variable):
    """Fixed RoPE periods: a buffer (Meta's ``rope_embed.periods``), never trained."""


def rope_periods(
    head_dim: int,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
) -> np.ndarray:
    """Periods [head_dim // 4]: ``base ** (2i / (head_dim/2))``, or log-spaced in [min, max]."""
    n = head_dim // 4
    if base is not None:
        return (base ** (2.0 * np.arange(n, dtype=np.float32) / (head_dim // 2))).astype(np.float32)
    exponents = np.linspace(0.0, 1.0, n, dtype=np.float32)
    ratio = max_period / min_period
    return (ratio**exponents / ratio * max_period).astype(np.float32)


def rope_coords(height: int, width: int, normalize: str = "separate") -> jax.Array:
    """Patch-centre coordinates [H*W, 2] (row, col) in [-1, 1], row-major over the grid."""
    if normalize == "separate":
        denom_h, denom_w = height, width
    elif normalize == "max":
        denom_h = denom_w = max(height, width)
    else:
        denom_h = denom_w = min(height, width)
    ch = jnp.arange(0.5, height, dtype=jnp.float32) / denom_h
    cw = jnp.arange(0.5, width, dtype=jnp.float32) / denom_w
    grid = jnp.stack(jnp.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(-1, 2)
    return 2.0 * grid - 1.0


def augment_coords(
    coords: jax.Array,
    key: jax.Array,
    shift: float | None,
    jitter: float | None,
    rescale: float | None,
) -> jax.Array:
    """DINOv3's training-time coordinate augmentations, one draw per call (shared by the batch).

    shift: add U(-shift, shift) per axis; jitter: multiply each axis by a log-uniform factor in
    [1/jitter, jitter]; rescale: multiply both axes by one log-uniform factor in [1/r, r].
    """
    k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(k_shift, (2,), jnp.float32, -shift, shift)[None, :]
    if jitter is not None:
        log_j = math.log(jitter)
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (2,), jnp.float32, -log_j, log_j))
    if rescale is not None:
        log_r = math.log(rescale)
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -log_r, log_r))
    return coords


def rope_sin_cos(coords: jax.Array, periods: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin, cos [N, head_dim] in float32 for coordinates [N, 2] and periods [head_dim // 4]."""
    angles = 2.0 * math.pi * coords[:, :, None] / periods.astype(jnp.float32)[None, None, :]
    angles = angles.reshape(coords.shape[0], -1)  # [N, D/2]: row freqs then col freqs
    angles = jnp.concatenate([angles, angles], axis=-1)  # [N, D]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate x [B, N, heads, D] by sin/cos [N, D] (rotate-half convention) in float32."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


class RopeEmbedding(nnx.Module):
    """Holds the periods buffer and builds sin/cos for a patch grid."""

    def __init__(self, config: ViTConfig):
        self.config = config
        self.periods = RopePeriods(
            jnp.asarray(
                rope_periods(
                    config.head_dim, config.rope_base, config.rope_min_period, config.rope_max_period
                )
            )
        )

    @property
    def augments(self) -> bool:
        c = self.config
        return any(v is not None for v in (c.rope_shift_coords, c.rope_jitter_coords, c.rope_rescale_coords))

    def __call__(
        self, height: int, width: int, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """sin, cos for an HxW grid; coordinates are augmented only when a key is given."""
        c = self.config
        coords = rope_coords(height, width, c.rope_normalize_coords)
        if key is not None and self.augments:
            coords = augment_coords(
                coords, key, c.rope_shift_coords, c.rope_jitter_coords, c.rope_rescale_coords
            )
        return rope_sin_cos(coords, self.periods[...])
