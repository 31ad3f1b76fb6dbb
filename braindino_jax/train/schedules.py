"""Training schedules as pure functions of the step, with DINOv3's exact shapes.

DINOv3 (``dinov3/train/cosine_lr_scheduler.py``, ``CosineScheduler``) builds each schedule as a
table: ``warmup`` steps of ``linspace(start, base, warmup)`` (both ends included), then a
cosine from ``base`` to ``final`` over the remaining ``n = total - warmup`` steps,
``final + (base - final) (1 + cos(pi i / n)) / 2`` for ``i = 0 .. n-1``, and ``final`` past the
end. These functions evaluate the same formulas from the step, so they run inside ``jit`` with
no table and cannot drift from a resumed step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ITERATIONS_PER_EPOCH = 1250  # DINOv3's OFFICIAL_EPOCH_LENGTH: an "epoch" is fixed, not a data pass


def warmup_cosine(step: jax.Array | int, base: float, final: float, total_steps: int,
                  warmup_steps: int = 0, start: float = 0.0) -> jax.Array:
    """DINOv3 ``CosineScheduler(base, final, total, warmup, start)[step]`` in float32."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps: need 0 <= warmup ({warmup_steps}) <= total ({total_steps})")
    step = jnp.asarray(step, jnp.float32)
    cosine_steps = total_steps - warmup_steps
    if warmup_steps > 1:
        warm = start + (base - start) * step / (warmup_steps - 1)
    else:
        warm = jnp.asarray(base if warmup_steps == 0 else start, jnp.float32)
    if cosine_steps > 0:
        i = step - warmup_steps
        cos = final + 0.5 * (base - final) * (1.0 + jnp.cos(math.pi * i / cosine_steps))
    else:
        cos = jnp.asarray(final, jnp.float32)
    value = jnp.where(step < warmup_steps, warm, cos)
    return jnp.where(step >= total_steps, final, value).astype(jnp.float32)


def scaled_lr(base_lr: float, batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """DINOv3's learning-rate scaling with the global batch (``apply_scaling_rules_to_cfg``)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * 4.0 * math.sqrt(batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"scaling_rule: expected 'sqrt_wrt_1024', 'linear_wrt_256' or 'none', got {rule!r}")


@dataclasses.dataclass(frozen=True)
class Schedules:
    """Every per-step hyper-parameter of a run (all in steps; built by ``train.config``)."""

    total_steps: int
    lr: float                      # peak, already scaled with the batch
    min_lr: float
    lr_warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    teacher_temp_start: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    def __call__(self, step: jax.Array | int) -> dict[str, jax.Array]:
        """All values at ``step``: lr, weight_decay, momentum, teacher_temp, last_layer_lr_scale."""
        t = self.total_steps
        return {
            "lr": warmup_cosine(step, self.lr, self.min_lr, t, self.lr_warmup_steps),
            "weight_decay": warmup_cosine(step, self.weight_decay, self.weight_decay_end, t),
            "momentum": warmup_cosine(step, self.momentum, self.momentum_end, t),
            # DINOv3: CosineScheduler(base=final=teacher_temp, total=warmup=W, start): a linear
            # warm-up over W steps, then constant.
            "teacher_temp": warmup_cosine(step, self.teacher_temp, self.teacher_temp,
                                          self.teacher_temp_warmup_steps,
                                          self.teacher_temp_warmup_steps, self.teacher_temp_start),
            "last_layer_lr_scale": (jnp.asarray(step) >= self.freeze_last_layer_steps).astype(jnp.float32),
        }
