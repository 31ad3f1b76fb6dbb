"""The train step's loss composition against Meta's own: tests/fixtures/dinov3_step_losses.npz.

The fixture (tools/make_dinov3_step_losses_fixture.py) is DINOv3's ``SSLMetaArch.forward_backward``
run on fixed backbone features with small DINOv3 heads: the heads' logits, the Sinkhorn-Knopp
targets, the total loss and each term (DINO global and local, iBOT, KoLeo, Gram at the image and
the batch level) and the gradients. Our side is ``train.step``'s own ``teacher_targets`` and
``loss_terms`` (what the jitted step calls) with our default loss settings, so a change of
weights, scales, pairings or normalisations on either side shows here.

Arrays in the fixture are crop-major, as DINOv3 collates them (``[n_crops·B, ...]``); our step
works sample-major, but the losses only see crop-major views, and with one device group the
gathered masked tokens come in DINOv3's order.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braindino_jax.models.convert import torch_to_head
from braindino_jax.ssl.ibot import masked_token_indices
from braindino_jax.train.config import LossSpec, default_config
from braindino_jax.train.step import N_GLOBAL, gather_masked, loss_terms, teacher_targets

F = np.load(Path(__file__).parents[1] / "fixtures" / "dinov3_step_losses.npz")
CASES = ("base", "gram_image", "gram_batch")
MASKS = F["masks"]                      # [2B, P] bool, crop-major
N_IMAGES, N_PATCHES = MASKS.shape
B = N_IMAGES // N_GLOBAL
M = int(MASKS.sum())
PAD = 3                                 # our static buffer: M masked tokens + padding slots
TEMP = float(F["teacher_temp"])
LOSS_TOL = dict(rtol=2e-6, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)


def _meta(case: str) -> dict:
    return json.loads(str(F[f"{case}/config"]))


def _spec(case: str) -> LossSpec:
    """Our default loss settings, checked to be DINOv3's, with the case's Gram settings."""
    meta, lo = _meta(case), default_config().loss
    assert (lo.dino_weight, lo.ibot_weight, lo.koleo_weight) == (
        meta["dino_loss_weight"], meta["ibot_loss_weight"], meta["koleo_loss_weight"])
    assert lo.student_temp == meta["dino_student_temp"] == meta["ibot_student_temp"]
    assert lo.centering == "sinkhorn_knopp" and lo.sinkhorn_iterations == 3
    assert meta["global_ignore_diagonal"]  # the step always ignores the diagonal
    assert not meta["gram_remove_neg"]
    return LossSpec(
        dino_weight=lo.dino_weight, ibot_weight=lo.ibot_weight, koleo_weight=lo.koleo_weight,
        student_temp=lo.student_temp, centering=lo.centering,
        sinkhorn_iterations=lo.sinkhorn_iterations, center_momentum=lo.center_momentum,
        gram_weight=meta["gram_loss_weight"] if meta["gram_use_loss"] else 0.0,
        gram_image_level=bool(meta["gram_img_level"]), gram_negatives="keep",
        gram_normalize=meta["gram_normalized"])


def _crops(x: np.ndarray) -> jnp.ndarray:
    """``[n·B, ...]`` -> ``[n, B, ...]``."""
    return jnp.asarray(x).reshape((-1, B) + x.shape[1:])


def _padded(x: np.ndarray, fill: float) -> jnp.ndarray:
    return jnp.concatenate([jnp.asarray(x), jnp.full((PAD,) + x.shape[1:], fill, x.dtype)])


def _weights():
    indices, weights = masked_token_indices(jnp.asarray(MASKS), M + PAD)
    return indices, weights


def _compose(spec, s_global, s_local, s_masked, s_cls, s_patches, dino_targets, ibot_targets,
             weights):
    return loss_terms(spec, student_global=s_global, student_local=s_local,
                      dino_targets=dino_targets, student_masked=s_masked,
                      ibot_targets=ibot_targets, ibot_weights=weights, n_images=N_IMAGES,
                      student_cls=s_cls, koleo_group=B, student_patches=s_patches,
                      gram_targets=jnp.asarray(F["teacher/patch"]), gram_group=N_IMAGES)


def _check_terms(case, total, terms):
    np.testing.assert_allclose(terms["dino"].global_crops, F[f"{case}/dino_global_crops_loss"],
                               **LOSS_TOL)
    np.testing.assert_allclose(terms["dino"].local_crops, F[f"{case}/dino_local_crops_loss"],
                               **LOSS_TOL)
    np.testing.assert_allclose(terms["ibot"], F[f"{case}/ibot_loss"], **LOSS_TOL)
    np.testing.assert_allclose(terms["koleo"], F[f"{case}/koleo_loss"], **LOSS_TOL)
    if f"{case}/gram_loss" in F:
        np.testing.assert_allclose(terms["gram"], F[f"{case}/gram_loss"], **LOSS_TOL)
    else:
        assert "gram" not in terms
    np.testing.assert_allclose(total, F[f"{case}/loss"], **LOSS_TOL)


def _check_grad(case, name, ours):
    key = f"{case}/grad/{name}"
    want = F[key] if key in F else np.zeros_like(ours)  # Meta: no gradient reached it
    np.testing.assert_allclose(ours, want.reshape(ours.shape), err_msg=key, **GRAD_TOL)


def test_masked_tokens_and_weights_equal_dinov3_collate():
    indices, weights = _weights()
    np.testing.assert_array_equal(indices[:M], F["mask_indices"])
    np.testing.assert_allclose(weights[:M], F["masks_weight"], rtol=1e-7)
    assert np.all(np.asarray(weights[M:]) == 0)


def test_sinkhorn_targets_equal_dinov3():
    spec, k = _spec("base"), F["teacher/cls_after_head"].shape[-1]
    dino = teacher_targets(spec, jnp.asarray(F["teacher/cls_after_head"]), jnp.zeros(k), TEMP)
    np.testing.assert_allclose(dino, F["teacher/cls_centered"], rtol=1e-5, atol=1e-7)
    _, weights = _weights()
    logits = _padded(F["teacher/masked_patch_after_head"], 7.0)  # junk in the padding slots
    ibot = teacher_targets(spec, logits, jnp.zeros(k), TEMP, valid=weights > 0)
    np.testing.assert_allclose(ibot[:M], F["teacher/masked_patch_centered"], rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(ibot[M:]) == 0)


@pytest.mark.parametrize("case", CASES)
def test_loss_terms_and_gradients_from_dinov3_head_outputs(case):
    """Meta's logits and targets in, our composition out: every term, the total, and the
    gradients with respect to the student's logits, KoLeo's CLS inputs and Gram's patches."""
    spec = _spec(case)
    _, weights = _weights()
    dino_targets = jnp.asarray(F["teacher/cls_centered"])
    ibot_targets = _padded(F["teacher/masked_patch_centered"], 0.0)
    inputs = (jnp.asarray(F["student/global_cls_after_head"]),
              jnp.asarray(F["student/local_cls_after_head"]),
              _padded(F["student/masked_patch_after_head"], 3.0),
              _crops(F["student/global_cls"]), jnp.asarray(F["student/global_patch"]))
    fn = lambda *x: _compose(spec, *x, dino_targets, ibot_targets, weights)  # noqa: E731
    (total, terms), grads = jax.value_and_grad(fn, argnums=tuple(range(5)), has_aux=True)(*inputs)
    _check_terms(case, total, terms)
    g_global, g_local, g_masked, g_cls, g_patches = grads
    _check_grad(case, "global_cls_after_head", g_global)
    _check_grad(case, "local_cls_after_head", g_local)
    _check_grad(case, "masked_patch_after_head", g_masked[:M])
    assert np.all(np.asarray(g_masked[M:]) == 0)
    _check_grad(case, "cls_pre_head", g_cls)
    _check_grad(case, "patch_pre_head", g_patches)


def _heads(net: str):
    return {name: torch_to_head({k.split("/", 2)[2]: F[k] for k in F.files
                                 if k.startswith(f"{net}/{name}/")})
            for name in ("dino_head", "ibot_head")}


@pytest.mark.parametrize("case", CASES)
def test_whole_loss_from_backbone_features(case):
    """Backbone features in: our heads (converted from Meta's), our masked-token gather, our
    targets and composition; the heads' logits, the loss and the gradients with respect to the
    student's backbone features equal Meta's."""
    spec = _spec(case)
    student, teacher = _heads("student"), _heads("teacher")
    masks, bound = jnp.asarray(MASKS), M + PAD
    t_cls = _crops(teacher["dino_head"](jnp.asarray(F["teacher/cls"])))
    t_patches, weights = gather_masked(jnp.asarray(F["teacher/patch"]), masks, 1, bound)
    t_masked = teacher["ibot_head"](t_patches)
    np.testing.assert_allclose(t_cls, F["teacher/cls_after_head"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_masked[:M], F["teacher/masked_patch_after_head"],
                               rtol=1e-5, atol=1e-5)
    k = t_cls.shape[-1]
    dino_targets = teacher_targets(spec, t_cls, jnp.zeros(k), TEMP)
    ibot_targets = teacher_targets(spec, t_masked, jnp.zeros(k), TEMP, valid=weights > 0)

    def fn(global_cls, global_patch, local_cls):
        s_global = _crops(student["dino_head"](global_cls))
        s_local = _crops(student["dino_head"](local_cls))
        s_patches, _ = gather_masked(global_patch, masks, 1, bound)
        s_masked = student["ibot_head"](s_patches)
        total, terms = _compose(spec, s_global, s_local, s_masked, global_cls.reshape(N_GLOBAL, B, -1),
                                global_patch, dino_targets, ibot_targets, weights)
        return total, (terms, s_global, s_local, s_masked)

    features = tuple(jnp.asarray(F[f"student/{n}"]) for n in ("global_cls", "global_patch", "local_cls"))
    (total, (terms, s_global, s_local, s_masked)), grads = jax.value_and_grad(
        fn, argnums=(0, 1, 2), has_aux=True)(*features)
    np.testing.assert_allclose(s_global, F["student/global_cls_after_head"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_local, F["student/local_cls_after_head"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_masked[:M], F["student/masked_patch_after_head"],
                               rtol=1e-5, atol=1e-5)
    _check_terms(case, total, terms)
    for name, grad in zip(("global_cls", "global_patch", "local_cls"), grads):
        _check_grad(case, name, grad)
