"""Teacher targets: softmax centering with an EMA center, or Sinkhorn-Knopp.

Both turn teacher logits [..., K] into target distributions over K prototypes, and both keep
the teacher from collapsing onto one prototype. They reduce over every leading axis ("samples":
the train step passes the DINO head's [crops, batch, K] and iBOT's gathered [M, K] buffer)
without merging those axes: merging the unsharded crop axis with the batch axis that the mesh
splits would make XLA all-gather the whole [crops, batch, K] array onto every device (512 MiB
per device per step at K = 65536 and 2 x 1024 samples) and repeat the work on each. Reducing
over the axes in place leaves every device its own samples, and the cross-device traffic is
the all-reduce of [K]-sized sums (tests/ssl/test_centering.py checks the compiled HLO).

Targets are constants for the loss (``stop_gradient``), as the teacher receives no gradient.
All arithmetic is in at least float32, whatever the input dtype (see ``dtypes``), and shifts
come before the division by the temperature: ``t / τ`` of a logit near 400 with τ = 0.04 is
1e4, whose float32 spacing (1e-3) would put a relative error of about 1e-3 on the targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braindino_jax.ssl.dtypes import as_loss_dtype


def _samples(teacher_logits: jax.Array, valid: jax.Array | None
             ) -> tuple[jax.Array, jax.Array | None, tuple[int, ...]]:
    """Teacher logits as float32 [..., K], the bool validity mask [...] and the sample axes."""
    logits = jnp.asarray(teacher_logits)
    if logits.ndim < 2:
        raise ValueError(f"teacher_logits: expected [..., K], got shape {logits.shape}")
    axes = tuple(range(logits.ndim - 1))
    logits = jax.lax.stop_gradient(as_loss_dtype(logits))
    if valid is None:
        return logits, None, axes
    valid = jnp.asarray(valid)
    if valid.shape != logits.shape[:-1]:
        raise ValueError(f"valid: expected shape {logits.shape[:-1]} (teacher_logits without K), "
                         f"got {valid.shape}")
    return logits, valid.astype(bool), axes


def _center(center: jax.Array, k: int) -> jax.Array:
    """The center in the loss dtype, checked to be [K] for the logits' K."""
    center = as_loss_dtype(center)
    if center.shape != (k,):
        raise ValueError(f"center: expected shape ({k},), got {center.shape}")
    return center


def softmax_center_targets(teacher_logits: jax.Array, center: jax.Array,
                           temperature: float | jax.Array) -> jax.Array:
    """DINO softmax centering: ``softmax((t - c) / τ_t)`` over the prototypes, float32 [..., K].

    Each sample's logits and the center are shifted by their own maxima before they are
    subtracted (a constant per sample, which the softmax ignores): ``t - c`` formed directly
    rounds to the spacing of the larger of the two, which τ then magnifies when the center is
    far from the logits (at the start of training, or once the logits have drifted).
    """
    logits, _, _ = _samples(teacher_logits, None)
    center = _center(center, logits.shape[-1])
    shifted = (logits - jnp.max(logits, axis=-1, keepdims=True)) - (center - jnp.max(center))
    return jax.nn.softmax(shifted / temperature, axis=-1)


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float = 0.9,
                  valid: jax.Array | None = None) -> jax.Array:
    """EMA of the teacher logits' mean over the (global) batch: ``m·c + (1 − m)·mean(t)``.

    Call it after the targets of this step are made, so step t is centred with the batches up
    to t−1. With ``valid`` (iBOT's padded buffer) only valid samples enter the mean, and a batch
    with none leaves the center unchanged.
    """
    logits, valid, axes = _samples(teacher_logits, valid)
    center = _center(center, logits.shape[-1])
    if valid is None:
        count = jnp.asarray(logits[..., 0].size, logits.dtype)
        total = jnp.sum(logits, axis=axes)
    else:
        weights = valid.astype(logits.dtype)
        count = jnp.sum(weights)
        total = jnp.sum(logits * weights[..., None], axis=axes)
    updated = momentum * center + (1.0 - momentum) * total / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, updated, center).astype(center.dtype)


def sinkhorn_knopp(teacher_logits: jax.Array, temperature: float | jax.Array,
                   n_iterations: int = 3, valid: jax.Array | None = None) -> jax.Array:
    """Sinkhorn-Knopp targets, float32 [..., K]: each sample's row sums to 1.

    Same iterates as the DINOv2/SwAV reference, ``Q = exp(t/τ)``, then ``n_iterations`` of
    (normalise each prototype's mass over the global batch to 1/K, normalise each sample to
    1/B), returned per sample. The reference's global scalar normalisations cancel, so this
    runs in the log domain: every normalisation is a ``logsumexp``, which subtracts the max
    before ``exp``. It cannot overflow (the naive ``exp(t/τ)`` does in float32 once t/τ > 88)
    and cannot divide by an underflowed zero sum. Before τ divides them, the logits are shifted
    by each prototype's maximum over the valid samples, which the first (per-prototype)
    normalisation cancels exactly; so a common offset of the logits, or one per prototype,
    costs no precision. Samples with ``valid`` False (padding) take no part in the sums and
    get all-zero rows.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations: must be >= 1, got {n_iterations}")
    logits, valid, axes = _samples(teacher_logits, valid)
    where = None if valid is None else valid[..., None]
    peak = jnp.max(logits, axis=axes, keepdims=True, where=where, initial=-jnp.inf)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)  # no valid sample: nothing to shift

    def iteration(_, log_q):
        per_prototype = jax.nn.logsumexp(log_q, axis=axes, where=where, keepdims=True)
        # No valid sample at all: the sum is empty (-inf); leave the logits as they are.
        log_q = log_q - jnp.where(jnp.isfinite(per_prototype), per_prototype, 0.0)
        return log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)

    log_q = jax.lax.fori_loop(0, n_iterations, iteration, (logits - peak) / temperature)
    probs = jnp.exp(log_q)
    return probs if valid is None else jnp.where(where, probs, 0.0)
