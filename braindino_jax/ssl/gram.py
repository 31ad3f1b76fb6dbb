"""Gram anchoring (DINOv3): keep the student's patch similarities close to a frozen teacher's.

Long or high-resolution training degrades patch features while the CLS features keep
improving. Gram anchoring regularises the pairwise cosine similarities of the student's patch
features towards those of a "Gram teacher", an earlier EMA-teacher snapshot, which leaves the
features themselves free to move.

Checked against Meta's ``GramLoss`` (``dinov3/loss/gram_loss.py``) on the same inputs, loss
and gradient, for every ``negatives`` mode (tests/fixtures/dinov3_gram.npz).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braindino_jax.ssl.dtypes import as_loss_dtype
from braindino_jax.ssl.normalize import l2_normalize

NEGATIVES = ("keep", "remove", "remove_teacher")


def gram_loss(student_patches: jax.Array, teacher_patches: jax.Array, image_level: bool = True,
              negatives: str = "keep", normalize: bool = True,
              precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
              group_size: int | None = None) -> jax.Array:
    """Mean squared difference of the student and teacher Gram matrices, float32.

    Features [B, N, D] (teacher: the Gram teacher's, treated as constants). With
    ``normalize`` they are L2-normalised, so Gram entries are cosine similarities. Gram
    matrices are [B, N, N] per image (``image_level``) or one [B·N, B·N] over the batch.
    ``negatives``: "keep" (the default: every DINOv3 config sets ``remove_neg: false``);
    "remove" clamps negative similarities to 0 in both matrices (``remove_neg``);
    "remove_teacher" clamps the teacher's only (``remove_only_teacher_neg``: DINOv3's code also
    zeroes the student where both are negative, but tests the teacher's already-clamped matrix,
    so it never does; we reproduce what it computes). The loss is
    ‖G_s − G_t‖_F² / (number of Gram entries), as DINOv3's ``GramLoss`` (an MSE).

    Batch-level Gram in DINOv3 is over each GPU's own images. Under a global ``jit`` it would
    span the global batch, a different loss whose [B·N, B·N] matrix outgrows memory at scale;
    ``group_size`` (images per group, dividing B; ``None``: one group) gives one Gram matrix per
    group of consecutive images, so ``B // n_devices`` reproduces the per-device loss (the mean
    of the equal-size groups' MSEs) with no cross-device traffic, as in ``koleo``.
    """
    if student_patches.ndim != 3 or student_patches.shape != teacher_patches.shape:
        raise ValueError(
            f"student_patches/teacher_patches: expected equal [B, N, D], got "
            f"{student_patches.shape} and {teacher_patches.shape}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives: expected one of {NEGATIVES}, got {negatives!r}")
    student = as_loss_dtype(student_patches)
    teacher = jax.lax.stop_gradient(as_loss_dtype(teacher_patches))
    if normalize:
        student, teacher = l2_normalize(student, 1e-12), l2_normalize(teacher, 1e-12)
    if not image_level:
        batch = student.shape[0]
        group = batch if group_size is None else group_size
        if group < 1 or batch % group:
            raise ValueError(
                f"group_size: must be >= 1 and divide the batch of {batch}, got {group_size}")
        student = student.reshape(batch // group, -1, student.shape[-1])
        teacher = teacher.reshape(batch // group, -1, teacher.shape[-1])
    gram_s = jnp.einsum("bnd,bmd->bnm", student, student, precision=precision)
    gram_t = jnp.einsum("bnd,bmd->bnm", teacher, teacher, precision=precision)
    if negatives == "remove":
        gram_s, gram_t = jnp.maximum(gram_s, 0.0), jnp.maximum(gram_t, 0.0)
    elif negatives == "remove_teacher":
        gram_t = jnp.maximum(gram_t, 0.0)
    return jnp.mean(jnp.square(gram_s - gram_t))
