"""L2 normalisation shared by the feature-space losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / max(‖x‖, eps)`` over the last axis (``torch.nn.functional.normalize``).

    Written as ``x / sqrt(max(‖x‖², eps²))`` so the gradient stays finite at x = 0.
    """
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
