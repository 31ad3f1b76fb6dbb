"""L2 normalisation shared by the projection heads and the feature-space losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` over the last axis (``torch.nn.functional.normalize``), in x's dtype.

    The vector is first divided by its largest magnitude so that the squared norm cannot
    overflow (activations of 1e20 and more would give inf/inf otherwise), and the floor is taken
    on the squared norm so that the gradient at x = 0 is finite (sqrt'(0) is not). The result
    does not depend on that scale, so holding it constant leaves the gradient exact.
    """
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    y = x / scale
    squared = jnp.sum(y * y, axis=-1, keepdims=True)
    return y / jnp.sqrt(jnp.maximum(squared, (eps / scale) ** 2))
