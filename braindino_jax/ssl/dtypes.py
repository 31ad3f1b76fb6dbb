"""The dtype the losses compute in: at least float32, whatever the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_loss_dtype(x: jax.Array) -> jax.Array:
    """``x`` in float32 if it is of lower precision (bf16, f16, ints); float64 stays float64.

    Losses, softmax and normalisation must not run in bf16. float64 only appears with
    ``jax_enable_x64`` (gradient checks), where keeping it makes the check meaningful.
    """
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
