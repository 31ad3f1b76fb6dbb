"""KoLeo regulariser: Kozachenko-Leonenko entropy estimate, within groups of the batch.

DINOv2/DINOv3 compute KoLeo on each device's own part of the batch: the nearest neighbour is
searched among that device's samples only. Under a global ``jit`` a plain implementation would
search the whole global batch instead, a different (and quadratically costlier) regulariser.
Here the batch axis is split into consecutive groups of ``group_size`` samples, each searched
on its own. With the batch sharded contiguously over D devices (``P(('data', 'fsdp'))``),
``group_size = global_batch // D`` reproduces the per-device semantics exactly, and the reshape
keeps every group on its own device, so no cross-device traffic arises.

Weight: the value is the mean over the leading axes (crops) and the samples. DINOv3 adds
``koleo_loss_weight · koleo_scale · mean over global crops`` with ``koleo_loss_weight = 0.1``
and ``koleo_scale = n_global_crops`` (``ssl_meta_arch.compute_losses``), i.e. 0.1 × the *sum*
over the global crops. So the caller passes the student's backbone CLS outputs of the G global
crops as [G, B, D] and adds ``0.1 * G * koleo_loss(...)`` (0.2 × this value for 2 crops);
adding ``0.1 * koleo_loss(...)`` would run KoLeo at half strength.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braindino_jax.ssl.dtypes import as_loss_dtype
from braindino_jax.ssl.normalize import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def koleo_loss(features: jax.Array, group_size: int | None = None, eps: float = 1e-8) -> jax.Array:
    """−mean log(nearest-neighbour distance) of L2-normalised features, per group, float32.

    ``features`` [..., B, D]; leading axes (e.g. the global crops) are independent sets.
    ``group_size`` must divide B (``None``: the whole batch is one group). Distances follow
    ``torch.nn.PairwiseDistance(eps)``, ‖x − y + eps‖, and the loss is
    −mean log(d + eps), so duplicate vectors give a large finite value (≈ 18 for D = 768).
    The mean over groups of equal size equals the mean over all samples.
    """
    x = as_loss_dtype(features)
    if x.ndim < 2:
        raise ValueError(f"features: expected [..., B, D], got shape {x.shape}")
    batch, dim = x.shape[-2:]
    group = batch if group_size is None else group_size
    if group < 2 or batch % group:
        raise ValueError(
            f"group_size: must be >= 2 and divide the batch of {batch}, got {group_size}")
    x = l2_normalize(x, eps).reshape(*x.shape[:-2], batch // group, group, dim)
    similarity = jnp.einsum("...id,...jd->...ij", x, x, precision=_HIGHEST)
    similarity = jnp.where(jnp.eye(group, dtype=bool), -jnp.inf, similarity)
    neighbour = jnp.argmax(jax.lax.stop_gradient(similarity), axis=-1)
    nearest = jnp.take_along_axis(x, neighbour[..., None], axis=-2)
    diff = x - nearest + eps
    distance = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    return -jnp.mean(jnp.log(distance + eps))
