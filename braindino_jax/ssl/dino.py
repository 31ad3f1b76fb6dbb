"""DINO CLS-token loss (DINOv2/DINOv3 weighting); the temperature schedule is in train/schedules."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from braindino_jax.ssl.dtypes import as_loss_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_crops(name: str, x: jax.Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name}: expected [crops, batch, K], got shape {x.shape}")


def _n_pairs(n_student: int, n_teacher: int, ignore_diagonal: bool) -> int:
    """(student crop, teacher crop) pairs, less the same-crop pairs if ``ignore_diagonal``."""
    n_pairs = n_student * n_teacher - (min(n_student, n_teacher) if ignore_diagonal else 0)
    if n_pairs == 0:
        raise ValueError("ignore_diagonal: leaves no (student, teacher) crop pair")
    return n_pairs


def dino_cross_entropy(student_logits: jax.Array, teacher_probs: jax.Array,
                       student_temp: float = 0.1, ignore_diagonal: bool = False) -> jax.Array:
    """Mean cross-entropy over all (student crop s, teacher crop t) pairs of the same image.

    ``student_logits`` [S, B, K], ``teacher_probs`` [T, B, K] (rows sum to 1). Returns

        −Σ_{s,t} Σ_b Σ_k q_{t,b,k} · log softmax(z_{s,b} / τ_s)_k  /  (B · n_pairs)

    with ``n_pairs = S·T``, or, if ``ignore_diagonal``, the pairs s == t dropped and
    ``n_pairs = S·T − min(S, T)`` (DINOv3: a global crop is not its own target). Float32.
    """
    _check_crops("student_logits", student_logits)
    _check_crops("teacher_probs", teacher_probs)
    n_student, batch, k = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (batch, k):
        raise ValueError(
            f"teacher_probs: shape {teacher_probs.shape} does not match student_logits "
            f"{student_logits.shape} in batch and K")
    log_p = jax.nn.log_softmax(as_loss_dtype(student_logits) / student_temp, axis=-1)
    targets = jax.lax.stop_gradient(as_loss_dtype(teacher_probs))
    pair_ce = -jnp.einsum("sbk,tbk->st", log_p, targets, precision=_HIGHEST)
    if ignore_diagonal:
        pair_ce = jnp.where(jnp.eye(n_student, n_teacher, dtype=bool), 0.0, pair_ce)
    return jnp.sum(pair_ce) / (batch * _n_pairs(n_student, n_teacher, ignore_diagonal))


class DinoLoss(NamedTuple):
    """The weighted DINO loss and its two parts, for logging."""

    total: jax.Array
    global_crops: jax.Array
    local_crops: jax.Array


def dino_loss(student_global_logits: jax.Array, student_local_logits: jax.Array | None,
              teacher_probs: jax.Array, student_temp: float = 0.1,
              ignore_diagonal: bool = True) -> DinoLoss:
    """DINO loss over global and local student crops, weighted as in DINOv2/DINOv3.

    With G global crops, L local crops and teacher targets from the G global crops:

        global = dino_cross_entropy(student_global, teacher, ignore_diagonal)
        local  = dino_cross_entropy(student_local,  teacher)
        n_g = G·(G − 1) if ignore_diagonal else G²,   n_l = G·L
        total = n_g/(n_g + n_l) · global + n_l/(n_g + n_l) · local

    i.e. every (student crop, teacher crop, image) term has the same weight, the mean over all
    ``B·(n_g + n_l)`` terms (DINOv3 ``ssl_meta_arch.compute_losses``; the same value as the
    original DINO loss over all views with same-view pairs skipped). The caller multiplies
    ``total`` by the DINO loss weight (1.0 in DINOv3).
    """
    global_ce = dino_cross_entropy(student_global_logits, teacher_probs, student_temp,
                                   ignore_diagonal)
    if student_local_logits is None or student_local_logits.shape[0] == 0:
        return DinoLoss(global_ce, global_ce, jnp.zeros((), jnp.float32))
    local_ce = dino_cross_entropy(student_local_logits, teacher_probs, student_temp)
    n_teacher = teacher_probs.shape[0]
    n_global = _n_pairs(student_global_logits.shape[0], n_teacher, ignore_diagonal)
    n_local = _n_pairs(student_local_logits.shape[0], n_teacher, False)
    total = (n_global * global_ce + n_local * local_ce) / (n_global + n_local)
    return DinoLoss(total, global_ce, local_ce)
