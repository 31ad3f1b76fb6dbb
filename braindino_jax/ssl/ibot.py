"""iBOT masked-patch loss with a static-size gather of the masked tokens.

The number of masked tokens varies per batch, which ``jit`` cannot express. As in DINOv2/v3
("upperbound"), the masked tokens of a batch are gathered into a buffer of fixed length
``max_masked`` (from :func:`braindino_jax.data.masking.max_masked_tokens`); padding slots carry
weight 0 and are excluded from the teacher's centering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braindino_jax.ssl.dtypes import as_loss_dtype


def masked_token_indices(masks: jax.Array, max_masked: int) -> tuple[jax.Array, jax.Array]:
    """Flat indices into [B·N] and weights ``1/n_masked(image)`` of the masked tokens, on device.

    ``masks`` bool [B, N]. Returns int32 [max_masked] indices (padding points at token 0) and
    float32 [max_masked] weights (0 for padding). Tokens beyond ``max_masked`` would be
    dropped; the bound from ``max_masked_tokens`` guarantees there are none.
    """
    masks = jnp.asarray(masks)
    if masks.ndim != 2 or masks.dtype != jnp.bool_:
        raise ValueError(f"masks: expected bool [B, N], got {masks.dtype} {masks.shape}")
    n_tokens = masks.shape[1]
    (indices,) = jnp.nonzero(masks.reshape(-1), size=max_masked, fill_value=0)
    per_image = jnp.sum(masks, axis=1).astype(jnp.float32)
    valid = jnp.arange(max_masked) < jnp.sum(masks)
    weights = jnp.where(valid, 1.0 / jnp.maximum(per_image[indices // n_tokens], 1.0), 0.0)
    return indices.astype(jnp.int32), weights


def gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """Tokens [B, N, D] at flat indices [M] into B·N: [M, D]."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens: expected [B, N, D], got shape {tokens.shape}")
    return jnp.take(tokens.reshape(-1, tokens.shape[-1]), indices, axis=0)


def ibot_loss(student_logits: jax.Array, teacher_probs: jax.Array, weights: jax.Array,
              n_images: int, student_temp: float = 0.1) -> jax.Array:
    """Masked-patch cross-entropy, each image's masked tokens sharing a total weight of 1.

    ``student_logits`` and ``teacher_probs`` are [M, K] at the gathered masked positions,
    ``weights`` [M] = 1/n_masked(image) (0 for padding), ``n_images`` the number of global-crop
    images in the batch (masked or not). Returns, as DINOv2/DINOv3 ``forward_masked``,

        −(1 / n_images) · Σ_m w_m Σ_k q_{m,k} log softmax(z_m / τ_s)_k

    so an unmasked image contributes 0 but still counts in the mean. Float32.
    """
    if student_logits.ndim != 2 or teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"student_logits/teacher_probs: expected equal [M, K], got {student_logits.shape} "
            f"and {teacher_probs.shape}")
    if weights.shape != student_logits.shape[:1]:
        raise ValueError(
            f"weights: expected shape ({student_logits.shape[0]},), got {weights.shape}")
    if n_images < 1:
        raise ValueError(f"n_images: must be >= 1, got {n_images}")
    log_p = jax.nn.log_softmax(as_loss_dtype(student_logits) / student_temp, axis=-1)
    targets = jax.lax.stop_gradient(as_loss_dtype(teacher_probs))
    token_ce = -jnp.sum(targets * log_p, axis=-1)
    return jnp.sum(token_ce * as_loss_dtype(weights)) / n_images
