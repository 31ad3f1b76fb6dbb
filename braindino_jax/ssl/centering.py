"""Teacher targets: softmax centering with an EMA center, or Sinkhorn-Knopp.

Both turn teacher logits [..., K] into target distributions over K prototypes, and both keep
the teacher from collapsing onto one prototype. They reduce over every leading axis ("samples"),
so under ``jax.jit`` with a batch sharded over a mesh the sums and means are over the global
batch: XLA inserts the cross-device reductions, and no explicit collective is needed.

Targets are constants for the loss (``stop_gradient``), as the teacher receives no gradient.
All arithmetic is in at least float32, whatever the input dtype (see ``dtypes``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braindino_jax.ssl.dtypes import as_loss_dtype


def _samples(teacher_logits: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Teacher logits as float32 [S, K] and a bool validity mask [S]."""
    logits = jnp.asarray(teacher_logits)
    if logits.ndim < 2:
        raise ValueError(f"teacher_logits: expected [..., K], got shape {logits.shape}")
    flat = jax.lax.stop_gradient(as_loss_dtype(logits)).reshape(-1, logits.shape[-1])
    if valid is None:
        return flat, jnp.ones(flat.shape[0], dtype=bool)
    valid = jnp.asarray(valid)
    if valid.shape != logits.shape[:-1]:
        raise ValueError(f"valid: expected shape {logits.shape[:-1]} (teacher_logits without K), "
                         f"got {valid.shape}")
    return flat, valid.reshape(-1).astype(bool)


def _center(center: jax.Array, k: int) -> jax.Array:
    """The center in the loss dtype, checked to be [K] for the logits' K."""
    center = as_loss_dtype(center)
    if center.shape != (k,):
        raise ValueError(f"center: expected shape ({k},), got {center.shape}")
    return center


def softmax_center_targets(teacher_logits: jax.Array, center: jax.Array,
                           temperature: float | jax.Array) -> jax.Array:
    """DINO softmax centering: ``softmax((t - c) / τ_t)`` over the prototypes, float32 [..., K]."""
    logits, _ = _samples(teacher_logits, None)
    center = _center(center, logits.shape[-1])
    probs = jax.nn.softmax((logits - center) / temperature, axis=-1)
    return probs.reshape(jnp.shape(teacher_logits))


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float = 0.9,
                  valid: jax.Array | None = None) -> jax.Array:
    """EMA of the teacher logits' mean over the (global) batch: ``m·c + (1 − m)·mean(t)``.

    Call it after the targets of this step are made, so step t is centred with the batches up
    to t−1. With ``valid`` (iBOT's padded buffer) only valid samples enter the mean, and a batch
    with none leaves the center unchanged.
    """
    logits, valid = _samples(teacher_logits, valid)
    center = _center(center, logits.shape[-1])
    weights = valid.astype(logits.dtype)
    count = jnp.sum(weights)
    batch_mean = jnp.sum(logits * weights[:, None], axis=0) / jnp.maximum(count, 1.0)
    updated = momentum * center + (1.0 - momentum) * batch_mean
    return jnp.where(count > 0, updated, center).astype(center.dtype)


def sinkhorn_knopp(teacher_logits: jax.Array, temperature: float | jax.Array,
                   n_iterations: int = 3, valid: jax.Array | None = None) -> jax.Array:
    """Sinkhorn-Knopp targets, float32 [..., K]: each sample's row sums to 1.

    Same iterates as the DINOv2/SwAV reference, ``Q = exp(t/τ)``, then ``n_iterations`` of
    (normalise each prototype's mass over the global batch to 1/K, normalise each sample to
    1/B), returned per sample. The reference's global scalar normalisations cancel, so this
    runs in the log domain: every normalisation is a ``logsumexp``, which subtracts the max
    before ``exp``. It cannot overflow (the naive ``exp(t/τ)`` does in float32 once t/τ > 88)
    and cannot divide by an underflowed zero sum. Samples with ``valid`` False (padding) take
    no part in the sums and get all-zero rows.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations: must be >= 1, got {n_iterations}")
    logits, valid = _samples(teacher_logits, valid)

    def iteration(_, log_q):
        per_prototype = jax.nn.logsumexp(log_q, axis=0, where=valid[:, None], keepdims=True)
        # No valid sample at all: the sum is empty (-inf); leave the logits as they are.
        log_q = log_q - jnp.where(jnp.isfinite(per_prototype), per_prototype, 0.0)
        return log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)

    log_q = jax.lax.fori_loop(0, n_iterations, iteration, logits / temperature)
    probs = jnp.where(valid[:, None], jnp.exp(log_q), 0.0)
    return probs.reshape(jnp.shape(teacher_logits))
