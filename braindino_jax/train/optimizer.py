"""AdamW with DINOv3's parameter groups and per-submodule gradient clipping, in optax.

The chain is ``clip each submodule's gradient norm`` → ``scale_by_adam`` →
``decoupled weight decay and per-group learning rates``. The per-step values (lr, weight decay,
the last-layer freeze) arrive as extra arguments of ``update``, computed from the train state's
step by ``train.schedules``; the optimizer keeps no schedule of its own, so a skipped
(non-finite) step, whose optimizer state is left untouched, cannot shift any schedule.

The update equals torch's AdamW per parameter group, as DINOv3 sets it
(``param_group["lr"] = lr * lr_multiplier``, ``weight_decay = wd * wd_multiplier``):
``p <- p - lr_g (adam(g) + wd_g p)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from braindino_jax.train.param_groups import path_names

SUBMODULES = ("backbone", "dino_head", "ibot_head")


def submodule_grad_norms(grads: Mapping[str, Any]) -> dict[str, jax.Array]:
    """L2 norm of each submodule's gradient (what DINOv3 clips and logs)."""
    return {name: optax.global_norm(grads[name]) for name in grads}


def clip_by_submodule_norm(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` applied to each top-level submodule on its own.

    As torch: ``g * min(1, max_norm / (‖g‖ + 1e-6))`` per submodule (DINOv3 clips the backbone,
    the DINO head and the iBOT head separately, each at ``clip_grad``).
    """

    def update(updates, state, params=None):
        del params
        scales = {name: jnp.minimum(1.0, max_norm / (norm + 1e-6))
                  for name, norm in submodule_grad_norms(updates).items()}

        def leaf(path, g):
            return g * scales[path_names(path)[0]].astype(g.dtype)

        return jax.tree_util.tree_map_with_path(leaf, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_param_groups(groups: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
    """``-lr·lr_mult·(u + wd·wd_mult·p)``, zero for the prototypes while they are frozen.

    ``groups`` is ``param_groups.param_groups(...)``: trees of lr and wd multipliers and
    ``last_layer`` flags shaped like the parameters. ``update`` needs the extra arguments
    ``lr``, ``weight_decay`` and ``last_layer_lr_scale`` (0 during the freeze, else 1). A frozen
    leaf gets an exact zero update, so it stays bit-identical.
    """

    def update(updates, state, params=None, *, lr, weight_decay, last_layer_lr_scale, **unused):
        del unused
        if params is None:
            raise ValueError("scale_by_param_groups needs params (decoupled weight decay)")

        def leaf(u, p, lr_mult, wd_mult, last):
            out = -(lr * lr_mult) * (u + (weight_decay * wd_mult) * p)
            if last:
                out = jnp.where(last_layer_lr_scale > 0, out, jnp.zeros_like(out))
            return out.astype(p.dtype)

        new = jax.tree.map(leaf, updates, params, groups["lr"], groups["wd"], groups["last_layer"])
        return new, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def build_optimizer(groups: Mapping[str, Any], *, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, clip_grad: float | None = 3.0,
                    ) -> optax.GradientTransformationExtraArgs:
    """The full chain; call ``update(grads, state, params, lr=, weight_decay=, last_layer_lr_scale=)``."""
    parts = [clip_by_submodule_norm(clip_grad)] if clip_grad else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), scale_by_param_groups(groups)]
    return optax.chain(*parts)
