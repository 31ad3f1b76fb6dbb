"""The train step's loss composition against Meta's own: tests/fixtures/dinov3_step_losses.npz.

The fixture (tools/make_dinov3_step_losses_fixture.py) is DINOv3's ``SSLMetaArch.forward_backward``
run on fixed backbone features with small DINOv3 heads: the heads' logits, the Sinkhorn-Knopp
targets, the total loss and each term (DINO global and local, iBOT, KoLeo, Gram at the image and
the batch level) and the gradients; and the same step on two processes. Our side is
``train.step``'s own ``teacher_targets`` and ``loss_terms`` (what the jitted step calls) with
our default loss settings, so a change of weights, scales, pairings, normalisations or
per-device grouping on either side shows here.

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
K = F["teacher/cls_after_head"].shape[-1]
RANKS = sorted({int(k.split("/")[1]) for k in F.files if k.startswith("ranks/")})
LOSS_TOL = dict(rtol=2e-6, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)
OUT_TOL = dict(rtol=1e-5, atol=1e-5)    # head outputs (logits of order 1-10)


def _spec(meta: dict) -> LossSpec:
    """Our default loss settings, checked to be DINOv3's, with the case's Gram settings."""
    lo = default_config().loss
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


def _case_spec(case: str) -> LossSpec:
    return _spec(json.loads(str(F[f"{case}/config"])))


def _crops(x, batch: int = B) -> jnp.ndarray:
    """``[n·B, ...]`` -> ``[n, B, ...]``."""
    return jnp.asarray(x).reshape((-1, batch) + x.shape[1:])


def _padded(x: np.ndarray, fill: float) -> jnp.ndarray:
    return jnp.concatenate([jnp.asarray(x), jnp.full((PAD,) + x.shape[1:], fill, x.dtype)])


def _compose(spec, s_global, s_local, s_masked, s_cls, s_patches, dino_targets, ibot_targets,
             weights, gram_targets, koleo_group=B, gram_group=N_IMAGES):
    return loss_terms(spec, student_global=s_global, student_local=s_local,
                      dino_targets=dino_targets, student_masked=s_masked,
                      ibot_targets=ibot_targets, ibot_weights=weights,
                      n_images=s_patches.shape[0], student_cls=s_cls, koleo_group=koleo_group,
                      student_patches=s_patches, gram_targets=jnp.asarray(gram_targets),
                      gram_group=gram_group)


def _check_terms(total, terms, want):
    """``want(name)``: Meta's value of a term (``loss`` for the total), or None if absent."""
    np.testing.assert_allclose(terms["dino"].global_crops, want("dino_global_crops_loss"), **LOSS_TOL)
    np.testing.assert_allclose(terms["dino"].local_crops, want("dino_local_crops_loss"), **LOSS_TOL)
    np.testing.assert_allclose(terms["ibot"], want("ibot_loss"), **LOSS_TOL)
    np.testing.assert_allclose(terms["koleo"], want("koleo_loss"), **LOSS_TOL)
    if want("gram_loss") is None:
        assert "gram" not in terms
    else:
        np.testing.assert_allclose(terms["gram"], want("gram_loss"), **LOSS_TOL)
    np.testing.assert_allclose(total, want("loss"), **LOSS_TOL)


def _case_value(case):
    return lambda name: F[f"{case}/{name}"] if f"{case}/{name}" in F else None


def _check_grad(key, ours, scale=1.0):
    want = F[key] * scale if key in F else np.zeros_like(ours)  # Meta: no gradient reached it
    np.testing.assert_allclose(ours, want.reshape(ours.shape), err_msg=key, **GRAD_TOL)


def _heads(net: str):
    return {name: torch_to_head({k.split("/", 2)[2]: F[k] for k in F.files
                                 if k.startswith(f"{net}/{name}/")})
            for name in ("dino_head", "ibot_head")}


def test_masked_tokens_and_weights_equal_dinov3_collate():
    indices, weights = masked_token_indices(jnp.asarray(MASKS), M + PAD)
    np.testing.assert_array_equal(indices[:M], F["mask_indices"])
    np.testing.assert_allclose(weights[:M], F["masks_weight"], rtol=1e-7)
    assert np.all(np.asarray(weights[M:]) == 0)


def test_sinkhorn_targets_equal_dinov3():
    spec = _case_spec("base")
    dino = teacher_targets(spec, jnp.asarray(F["teacher/cls_after_head"]), jnp.zeros(K), TEMP)
    np.testing.assert_allclose(dino, F["teacher/cls_centered"], rtol=1e-5, atol=1e-7)
    _, weights = masked_token_indices(jnp.asarray(MASKS), M + PAD)
    logits = _padded(F["teacher/masked_patch_after_head"], 7.0)  # junk in the padding slots
    ibot = teacher_targets(spec, logits, jnp.zeros(K), TEMP, valid=weights > 0)
    np.testing.assert_allclose(ibot[:M], F["teacher/masked_patch_centered"], rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(ibot[M:]) == 0)


@pytest.mark.parametrize("case", CASES)
def test_loss_terms_and_gradients_from_dinov3_head_outputs(case):
    """Meta's logits and targets in, our composition out: every term, the total, and the
    gradients with respect to the student's logits, KoLeo's CLS inputs and Gram's patches."""
    spec = _case_spec(case)
    _, weights = masked_token_indices(jnp.asarray(MASKS), M + PAD)
    dino_targets = jnp.asarray(F["teacher/cls_centered"])
    ibot_targets = _padded(F["teacher/masked_patch_centered"], 0.0)
    inputs = (jnp.asarray(F["student/global_cls_after_head"]),
              jnp.asarray(F["student/local_cls_after_head"]),
              _padded(F["student/masked_patch_after_head"], 3.0),
              _crops(F["student/global_cls"]), jnp.asarray(F["student/global_patch"]))
    fn = lambda *x: _compose(spec, *x, dino_targets, ibot_targets, weights,  # noqa: E731
                             F["teacher/patch"])
    (total, terms), grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(5)), has_aux=True))(
        *inputs)
    _check_terms(total, terms, _case_value(case))
    g_global, g_local, g_masked, g_cls, g_patches = grads
    # Gram does not reach the logits: their gradients are stored once, under "base".
    _check_grad("base/grad/global_cls_after_head", g_global)
    _check_grad("base/grad/local_cls_after_head", g_local)
    _check_grad("base/grad/masked_patch_after_head", g_masked[:M])
    assert np.all(np.asarray(g_masked[M:]) == 0)
    _check_grad(f"{case}/grad/cls_pre_head", g_cls)
    _check_grad(f"{case}/grad/patch_pre_head", g_patches)


@pytest.mark.parametrize("case", CASES)
def test_whole_loss_from_backbone_features(case):
    """Backbone features in: our heads (converted from Meta's), our masked-token gather, our
    targets and composition; the heads' logits, the loss and the gradients with respect to the
    student's backbone features equal Meta's."""
    spec = _case_spec(case)
    student, teacher = _heads("student"), _heads("teacher")
    masks, bound = jnp.asarray(MASKS), M + PAD
    t_cls = _crops(teacher["dino_head"](jnp.asarray(F["teacher/cls"])))
    t_patches, weights = gather_masked(jnp.asarray(F["teacher/patch"]), masks, 1, bound)
    t_masked = teacher["ibot_head"](t_patches)
    np.testing.assert_allclose(t_cls, F["teacher/cls_after_head"], **OUT_TOL)
    np.testing.assert_allclose(t_masked[:M], F["teacher/masked_patch_after_head"], **OUT_TOL)
    dino_targets = teacher_targets(spec, t_cls, jnp.zeros(K), TEMP)
    ibot_targets = teacher_targets(spec, t_masked, jnp.zeros(K), TEMP, valid=weights > 0)

    def fn(global_cls, global_patch, local_cls):
        s_global = _crops(student["dino_head"](global_cls))
        s_local = _crops(student["dino_head"](local_cls))
        s_patches, _ = gather_masked(global_patch, masks, 1, bound)
        s_masked = student["ibot_head"](s_patches)
        total, terms = _compose(spec, s_global, s_local, s_masked, _crops(global_cls),
                                global_patch, dino_targets, ibot_targets, weights,
                                F["teacher/patch"])
        return total, (terms, s_global, s_local, s_masked)

    names = ("global_cls", "global_patch", "local_cls")
    features = tuple(jnp.asarray(F[f"student/{n}"]) for n in names)
    (total, (terms, s_global, s_local, s_masked)), grads = jax.jit(jax.value_and_grad(
        fn, argnums=(0, 1, 2), has_aux=True))(*features)
    np.testing.assert_allclose(s_global, F["student/global_cls_after_head"], **OUT_TOL)
    np.testing.assert_allclose(s_local, F["student/local_cls_after_head"], **OUT_TOL)
    np.testing.assert_allclose(s_masked[:M], F["student/masked_patch_after_head"], **OUT_TOL)
    _check_terms(total, terms, _case_value(case))
    for name, grad in zip(names, grads):
        _check_grad(f"{case}/grad/{name}", grad)


def test_two_devices_equal_dinov3_on_two_ranks():
    """DINOv3 on two processes against our step's grouping with two device groups.

    Our batch is both ranks' samples (rank-major images, so each device group's images are
    consecutive, as the step's sharding makes them). Sinkhorn-Knopp runs over the whole batch
    (DINOv3: all-reduced sums), KoLeo over each group's samples and the batch-level Gram over
    each group's images (DINOv3: per rank), and the objective is the mean of the ranks' losses,
    whose gradient is each rank's gradient over the number of ranks (data-parallel averaging).
    """
    n_ranks = len(RANKS)
    rank = lambda r, key: F[f"ranks/{r}/{key}"]  # noqa: E731
    spec = _spec(json.loads(str(rank(0, "config"))))
    assert spec.gram_weight and not spec.gram_image_level
    br = rank(0, "student/global_cls").shape[0] // N_GLOBAL      # samples per rank
    n_local = rank(0, "student/local_cls").shape[0] // br

    def joined(key):  # rank-major concatenation of the ranks' flat crop-major arrays
        return jnp.concatenate([jnp.asarray(rank(r, key)) for r in RANKS])

    def crops(x, n):  # [ranks·n·br, ...] rank-major -> [n, ranks·br, ...] crop-major
        x = x.reshape((n_ranks, n, br) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((n, n_ranks * br) + x.shape[3:])

    masks = joined("masks")
    bound = max(int(rank(r, "masks").sum()) for r in RANKS) + PAD
    student, teacher = _heads("student"), _heads("teacher")
    t_cls = crops(teacher["dino_head"](joined("teacher/cls")), N_GLOBAL)
    t_patches, weights = gather_masked(joined("teacher/patch"), masks, n_ranks, bound)
    dino_targets = teacher_targets(spec, t_cls, jnp.zeros(K), TEMP)
    ibot_targets = teacher_targets(spec, teacher["ibot_head"](t_patches), jnp.zeros(K), TEMP,
                                   valid=weights > 0)
    want_targets = jnp.concatenate([jnp.asarray(rank(r, "teacher/cls_centered")) for r in RANKS],
                                   axis=1)
    np.testing.assert_allclose(dino_targets, want_targets, rtol=1e-5, atol=1e-7)

    def fn(global_cls, global_patch, local_cls):
        s_patches, _ = gather_masked(global_patch, masks, n_ranks, bound)
        return _compose(spec, crops(student["dino_head"](global_cls), N_GLOBAL),
                        crops(student["dino_head"](local_cls), n_local),
                        student["ibot_head"](s_patches), crops(global_cls, N_GLOBAL), global_patch,
                        dino_targets, ibot_targets, weights, joined("teacher/patch"),
                        koleo_group=br, gram_group=N_GLOBAL * br)

    names = ("global_cls", "global_patch", "local_cls")
    (total, terms), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(
        *(joined(f"student/{n}") for n in names))
    _check_terms(total, terms, lambda name: np.mean([rank(r, name) for r in RANKS]))
    for name, grad in zip(names, grads):
        for r, part in zip(RANKS, jnp.split(grad, n_ranks)):
            _check_grad(f"ranks/{r}/grad/{name}", part, scale=1.0 / n_ranks)
