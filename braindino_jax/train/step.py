"""The pretraining step: one jitted function from (state, batch) to (state, metrics).

Per step, all on the devices:
  1. multi-crop augmentation of the uint8 slices (``data.augment.augment_batch``);
  2. the EMA teacher on the global crops (no gradient): DINO-head targets for the CLS tokens
     and iBOT-head targets for the masked patches, centred by Sinkhorn-Knopp or softmax
     centering at the scheduled teacher temperature;
  3. the student on the masked global crops and on the local crops;
  4. the losses: DINO (global and local, DINOv3 weighting), iBOT on the masked tokens, KoLeo on
     each global crop's backbone CLS within each device's samples (weight × number of global
     crops × crop mean, as DINOv3's ``koleo_scale``), and Gram anchoring in stage 2;
  5. gradients, AdamW with parameter groups, the EMA teacher update, the center updates.

Layout: crops are flattened sample-major (``[B, n_crops, ...] -> [B·n_crops, ...]``), so a
device's samples and their crops stay on that device; the losses see crop-major views
``[n_crops, B, ...]`` (a transpose, no data movement). The iBOT masked tokens are gathered per
device group into a static buffer (``groups × bound``), so no device ever gathers another's
tokens; the pipeline stratifies its masks per group, which is what makes the bound hold.

Non-finite guard: if the loss, any loss term or any gradient is not finite, the update is
skipped: parameters, teacher, optimizer state and centers keep their exact bits, the step
advances (the batch is consumed) and the skip is counted. After ``max_consecutive_skips`` in a
row the state records ``guard.halted_at`` and which terms were non-finite, every later step is
a no-op, and the loop stops at its next look at the metrics. Nothing here talks to the host.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from braindino_jax.data.augment import augment_batch
from braindino_jax.ssl import centering, diagnostics, dino, gram, ibot, koleo
from braindino_jax.train.config import LossSpec, TrainSpec
from braindino_jax.train.optimizer import submodule_grad_norms
from braindino_jax.train.state import Networks, TrainState

N_GLOBAL = 2
NONFINITE_TERMS = ("dino", "ibot", "koleo", "gram", "gradients")


def crop_major(x: jax.Array, batch: int) -> jax.Array:
    """``[B·n, ...]`` (sample-major) → ``[n, B, ...]``."""
    return jnp.swapaxes(x.reshape((batch, -1) + x.shape[1:]), 0, 1)


def gather_masked(tokens: jax.Array, masks: jax.Array, groups: int,
                  bound: int) -> tuple[jax.Array, jax.Array]:
    """Masked tokens of each device group into a static buffer, with their iBOT weights.

    ``tokens`` [N, P, D] and ``masks`` bool [N, P] (N global-crop images, sample-major) are cut
    into ``groups`` consecutive blocks, one per device; each block's masked tokens go to
    ``bound`` slots (``ibot.masked_token_indices``). Returns [groups·bound, D] and weights
    [groups·bound] (1/n_masked of the token's image; 0 for padding).
    """
    n, p = masks.shape
    indices, weights = jax.vmap(lambda m: ibot.masked_token_indices(m, bound))(
        masks.reshape(groups, n // groups, p))
    blocks = tokens.reshape(groups, n // groups, p, tokens.shape[-1])
    buffer = jax.vmap(ibot.gather_tokens)(blocks, indices)
    return buffer.reshape(groups * bound, -1), weights.reshape(-1)


def teacher_targets(loss_spec: LossSpec, logits: jax.Array, center: jax.Array, temp: jax.Array,
                    valid: jax.Array | None = None) -> jax.Array:
    """The teacher's target distributions from its head logits (padding rows, ``~valid``, are 0)."""
    if loss_spec.centering == "sinkhorn_knopp":
        return centering.sinkhorn_knopp(logits, temp, loss_spec.sinkhorn_iterations, valid=valid)
    probs = centering.softmax_center_targets(logits, center, temp)
    if valid is not None:
        probs = jnp.where(valid[..., None], probs, 0.0)
    return probs


def loss_terms(loss_spec: LossSpec, *, student_global: jax.Array,
               student_local: jax.Array | None, dino_targets: jax.Array,
               student_masked: jax.Array, ibot_targets: jax.Array, ibot_weights: jax.Array,
               n_images: int, student_cls: jax.Array, koleo_group: int | None,
               student_patches: jax.Array | None = None, gram_targets: jax.Array | None = None,
               gram_group: int | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """The weighted total loss and its terms, from the heads' outputs (DINOv3 ``compute_losses``).

    ``student_global`` [G, B, K] and ``student_local`` [L, B, K] are the DINO head's logits on
    the global and local crops, ``dino_targets`` [G, B, K] the teacher's; ``student_masked``,
    ``ibot_targets`` [M, K] and ``ibot_weights`` [M] the iBOT head's logits, targets and weights
    at the gathered masked tokens of the ``n_images`` global-crop images; ``student_cls``
    [G, B, D] the student backbone's CLS outputs (KoLeo, within groups of ``koleo_group``
    samples); with Gram anchoring, ``student_patches`` and ``gram_targets`` [G·B, N, D] (in
    groups of ``gram_group`` images at the batch level). Returns ``(total, terms)``:

        total = w_dino · dino.total + w_ibot · ibot + w_koleo · G · koleo (+ w_gram · gram)

    (``dino.total`` carries DINOv3's global/local scales; KoLeo is the mean over the G crops,
    so ``G · koleo`` is DINOv3's ``koleo_scale`` times its crop mean.) Checked against Meta's
    ``SSLMetaArch.forward_backward`` (tests/train/test_step_losses_parity.py).
    """
    temp = loss_spec.student_temp
    terms = {
        "dino": dino.dino_loss(student_global, student_local, dino_targets, temp,
                               ignore_diagonal=True),
        "ibot": ibot.ibot_loss(student_masked, ibot_targets, ibot_weights, n_images=n_images,
                               student_temp=temp),
        "koleo": koleo.koleo_loss(student_cls, group_size=koleo_group),
    }
    n_global = student_global.shape[0]
    total = (loss_spec.dino_weight * terms["dino"].total
             + loss_spec.ibot_weight * terms["ibot"]
             + loss_spec.koleo_weight * n_global * terms["koleo"])
    if loss_spec.gram_weight:
        terms["gram"] = gram.gram_loss(
            student_patches, gram_targets, loss_spec.gram_image_level, loss_spec.gram_negatives,
            loss_spec.gram_normalize, group_size=None if loss_spec.gram_image_level else gram_group)
        total = total + loss_spec.gram_weight * terms["gram"]
    return total, terms


def make_step_fn(spec: TrainSpec, networks: Networks, optimizer: optax.GradientTransformationExtraArgs,
                 mask_bound: int, compute_sharding: Any = None,
                 ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step function (jit it with ``train.setup``'s shardings).

    KoLeo, batch-level Gram and the iBOT gather work per group of ``spec.group_batch``
    consecutive samples (``spec.groups`` groups: one per device by default, DINOv3's per-GPU
    semantics); ``mask_bound`` is the iBOT buffer slots per group.

    ``compute_sharding`` (a replicated NamedSharding) is where the forward and backward passes
    see the weights: FSDP keeps parameters, optimizer state and the EMA update sharded at rest,
    and each step gathers the weights for compute (the gradient's transpose is a
    reduce-scatter). Without it XLA may propagate the weights' split into the activations and
    move them between devices (all-to-alls inside attention) instead of the weights.
    """

    def for_compute(params):
        if compute_sharding is None:
            return params
        return jax.lax.with_sharding_constraint(
            params, jax.tree.map(lambda _: compute_sharding, params))

    groups = spec.groups
    loss_spec = spec.loss
    aug = spec.augment
    n_local = aug.n_local

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        pixels = batch["pixels"]
        b = pixels.shape[0]
        per_device = spec.group_batch
        sched = spec.schedules(state.step)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_aug, k_global, k_local = jax.random.split(key, 3)

        crops = augment_batch(k_aug, pixels, batch["fg_mean"], batch["fg_std"], aug)
        global_crops = crops["global"].reshape((b * N_GLOBAL,) + crops["global"].shape[2:])
        masks = batch["masks"].reshape(b * N_GLOBAL, -1)

        # Teacher: targets for the DINO (CLS) and iBOT (masked patch) losses; no gradient.
        teacher = networks.teacher(for_compute(jax.lax.stop_gradient(state.teacher)))
        t_out = teacher.backbone(global_crops)
        t_cls = crop_major(teacher.dino_head(t_out["x_norm_clstoken"]), b)        # [2, B, K]
        t_patches, weights = gather_masked(t_out["x_norm_patchtokens"], masks, groups, mask_bound)
        t_ibot = teacher.ibot_head(t_patches)                                       # [M, K']
        valid = weights > 0
        temp = sched["teacher_temp"]
        dino_targets = teacher_targets(loss_spec, t_cls, state.dino_center, temp)
        ibot_targets = teacher_targets(loss_spec, t_ibot, state.ibot_center, temp, valid)
        gram_targets = None
        if loss_spec.gram_weight:
            gram_backbone = networks.gram_teacher(for_compute(state.gram_teacher))
            gram_targets = jax.lax.stop_gradient(gram_backbone(global_crops)["x_norm_patchtokens"])

        def loss_fn(params):
            student = networks.student(for_compute(params))
            s_out = student.backbone(global_crops, masks, key=k_global)
            s_cls = crop_major(student.dino_head(s_out["x_norm_clstoken"]), b)     # [2, B, K]
            if n_local:
                local_crops = crops["local"].reshape((b * n_local,) + crops["local"].shape[2:])
                l_out = student.backbone(local_crops, key=k_local)
                s_local = crop_major(student.dino_head(l_out["x_norm_clstoken"]), b)
            else:
                s_local = None
            s_patches, _ = gather_masked(s_out["x_norm_patchtokens"], masks, groups, mask_bound)
            total, terms = loss_terms(
                loss_spec, student_global=s_cls, student_local=s_local, dino_targets=dino_targets,
                student_masked=student.ibot_head(s_patches), ibot_targets=ibot_targets,
                ibot_weights=weights, n_images=b * N_GLOBAL,
                student_cls=crop_major(s_out["x_norm_clstoken"], b), koleo_group=per_device,
                student_patches=s_out["x_norm_patchtokens"], gram_targets=gram_targets,
                gram_group=per_device * N_GLOBAL)
            return total, (terms, s_cls, s_out["x_norm_clstoken"])

        (total, (terms, s_cls, s_features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.student)
        grad_norms = submodule_grad_norms(grads)
        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.student, lr=sched["lr"],
            weight_decay=sched["weight_decay"], last_layer_lr_scale=sched["last_layer_lr_scale"])
        student = optax.apply_updates(state.student, updates)
        m = sched["momentum"]
        teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher, student)
        dino_center, ibot_center = state.dino_center, state.ibot_center
        if loss_spec.centering == "softmax":
            dino_center = centering.update_center(dino_center, t_cls, loss_spec.center_momentum)
            ibot_center = centering.update_center(ibot_center, t_ibot, loss_spec.center_momentum,
                                                  valid=valid)

        term_values = {"dino": terms["dino"].total, "ibot": terms["ibot"],
                       "koleo": terms["koleo"], "gram": terms.get("gram", jnp.zeros(())),
                       "gradients": sum(grad_norms.values())}
        bad = jnp.stack([~jnp.isfinite(term_values[t]) for t in NONFINITE_TERMS])
        finite = jnp.isfinite(total) & ~jnp.any(bad)
        guard = state.guard
        running = guard["halted_at"] < 0
        apply = finite & running
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
        consecutive = jnp.where(finite, 0, guard["consecutive"] + 1)
        bits = jnp.sum(bad.astype(jnp.int32) * (2 ** jnp.arange(len(NONFINITE_TERMS))))
        halt_now = running & (consecutive >= spec.max_consecutive_skips)
        new_guard = {
            "skipped": guard["skipped"] + (running & ~finite).astype(jnp.int32),
            "consecutive": jnp.where(running, consecutive, guard["consecutive"]),
            "halted_at": jnp.where(halt_now, state.step, guard["halted_at"]),
            "nonfinite": jnp.where(running & ~finite, bits, guard["nonfinite"]),
        }
        new_state = state.replace(
            step=state.step + 1,
            student=keep(student, state.student),
            teacher=keep(teacher_params, state.teacher),
            opt_state=keep(opt_state, state.opt_state),
            dino_center=keep(dino_center, state.dino_center),
            ibot_center=keep(ibot_center, state.ibot_center),
            guard=new_guard,
        )

        diag = diagnostics.collapse_diagnostics(
            dino_targets, s_cls, s_features, terms["koleo"],
            center=state.dino_center if loss_spec.centering == "softmax" else None,
            student_temp=loss_spec.student_temp)
        metrics = {
            "loss": total,
            "dino_loss": terms["dino"].total,
            "dino_global_loss": terms["dino"].global_crops,
            "dino_local_loss": terms["dino"].local_crops,
            "ibot_loss": terms["ibot"],
            "koleo_loss": terms["koleo"],
            **({"gram_loss": terms["gram"]} if loss_spec.gram_weight else {}),
            **{k: v for k, v in sched.items()},
            **{f"grad_norm/{k}": v for k, v in grad_norms.items()},
            **{f"diagnostics/{k}": v for k, v in diag.items() if k != "koleo"},
            "ibot_masked_tokens": jnp.sum(valid),
            # A fingerprint of the batch (wrapping pixel sum, 24 bits: exact as a float), so a
            # resumed run can show it sees the very batches an uninterrupted one would.
            "input_checksum": jnp.sum(pixels, dtype=jnp.uint32) & 0xFFFFFF,
            "skipped": (~apply).astype(jnp.int32),
            "skipped_total": new_guard["skipped"],
            "halted_at": new_guard["halted_at"],
            "nonfinite": new_guard["nonfinite"],
        }
        return new_state, metrics

    return step


def nonfinite_terms(bits: int) -> list[str]:
    """The names behind a ``guard.nonfinite`` bit mask."""
    return [name for i, name in enumerate(NONFINITE_TERMS) if int(bits) >> i & 1]
