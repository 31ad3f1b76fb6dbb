"""Collapse diagnostics: cheap scalars that show within minutes whether a DINO run collapses.

The two failure modes of self-distillation show up as:
  * uniform collapse: targets near uniform, entropy ratio → 1, loss near ln K;
  * one-hot (dimensional) collapse: every sample on the same prototype, per-sample entropy → 0
    but also effective prototypes → 1 and feature std across the batch → 0.
A healthy run has sharp per-sample targets (low entropy ratio) spread over many prototypes
(large effective count).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import entr

from braindino_jax.ssl.dtypes import as_loss_dtype
from braindino_jax.ssl.normalize import l2_normalize


def _leading(x: jax.Array) -> tuple[int, ...]:
    """Every axis but the last: the samples, reduced in place (a reshape to [-1, K] would merge
    a sharded batch axis with the crop axis and all-gather the whole array)."""
    return tuple(range(jnp.ndim(x) - 1))


def target_entropy(teacher_probs: jax.Array) -> jax.Array:
    """Mean over samples of the entropy (nats) of the teacher targets [..., K]."""
    return jnp.mean(jnp.sum(entr(as_loss_dtype(teacher_probs)), axis=-1))


def effective_prototypes(teacher_probs: jax.Array) -> jax.Array:
    """exp(entropy of the batch-mean target): how many prototypes the batch really uses."""
    mean_target = jnp.mean(as_loss_dtype(teacher_probs), axis=_leading(teacher_probs))
    return jnp.exp(jnp.sum(entr(mean_target)))


def student_teacher_kl(student_logits: jax.Array, teacher_probs: jax.Array,
                       student_temp: float = 0.1) -> jax.Array:
    """Mean over samples of KL(teacher ‖ softmax(student / τ_s)); both inputs [..., K]."""
    if jnp.shape(student_logits) != jnp.shape(teacher_probs):
        raise ValueError(
            f"student_logits/teacher_probs: shapes differ, {jnp.shape(student_logits)} and "
            f"{jnp.shape(teacher_probs)}")
    q = as_loss_dtype(teacher_probs)
    log_p = jax.nn.log_softmax(as_loss_dtype(student_logits) / student_temp, axis=-1)
    cross = -jnp.sum(q * log_p, axis=-1)
    return jnp.mean(cross - jnp.sum(entr(q), axis=-1))


def feature_std(features: jax.Array) -> jax.Array:
    """Std across the batch of L2-normalised features [..., B, D], averaged over dimensions.

    0 when all samples share one feature; about 1/sqrt(D) for features spread over the sphere.
    """
    x = l2_normalize(as_loss_dtype(features), 1e-8)
    return jnp.mean(jnp.std(x, axis=_leading(x)))


def collapse_diagnostics(teacher_probs: jax.Array, student_logits: jax.Array,
                         features: jax.Array, koleo: jax.Array, center: jax.Array | None = None,
                         student_temp: float = 0.1) -> dict[str, jax.Array]:
    """All collapse scalars in one dict, for logging every N steps.

    ``teacher_probs`` [..., K] targets and ``student_logits`` of the same shape (e.g. the
    global crops' CLS outputs), ``features`` [B, D] backbone CLS features, ``koleo`` the
    KoLeo loss value, ``center`` the softmax-centering center (absent for Sinkhorn).
    """
    k = jnp.shape(teacher_probs)[-1]
    entropy = target_entropy(teacher_probs)
    out = {
        "target_entropy": entropy,
        "target_entropy_ratio": entropy / math.log(k),
        "student_teacher_kl": student_teacher_kl(student_logits, teacher_probs, student_temp),
        "effective_prototypes": effective_prototypes(teacher_probs),
        "koleo": jnp.asarray(koleo, dtype=jnp.float32),
        "feature_std": feature_std(features),
    }
    if center is not None:
        out["center_norm"] = jnp.linalg.norm(jnp.asarray(center, dtype=jnp.float32))
    return out
