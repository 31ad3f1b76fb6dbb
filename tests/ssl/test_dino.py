"""DINO CLS loss: float64 reference from the equations, lightly, sharding, gradients, extremes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax
import torch
from jax.test_util import check_grads

from braindino_jax.ssl import centering
from braindino_jax.ssl.dino import dino_cross_entropy, dino_loss

G, L, B, K = 2, 3, 16, 32


def reference_pair_terms(student, teacher_probs, student_temp, skip_same_crop):
    """Every (student crop, teacher crop, image) cross-entropy term, as a flat list."""
    log_p = log_softmax(student.astype(np.float64) / student_temp, axis=-1)
    terms = []
    for s in range(student.shape[0]):
        for t in range(teacher_probs.shape[0]):
            if skip_same_crop and s == t:
                continue
            for b in range(student.shape[1]):
                terms.append(-np.sum(teacher_probs[t, b].astype(np.float64) * log_p[s, b]))
    return terms


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    student_global = rng.normal(size=(G, B, K)).astype(np.float32)
    student_local = rng.normal(size=(L, B, K)).astype(np.float32)
    teacher_logits = rng.normal(size=(G, B, K)).astype(np.float32)
    teacher = np.asarray(centering.sinkhorn_knopp(teacher_logits, 0.05))
    center = rng.normal(size=K).astype(np.float32)
    return student_global, student_local, teacher_logits, teacher, center


@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_cross_entropy_matches_reference(inputs, ignore_diagonal):
    student_global, _, _, teacher, _ = inputs
    got = dino_cross_entropy(student_global, teacher, 0.1, ignore_diagonal)
    want = np.mean(reference_pair_terms(student_global, teacher, 0.1, ignore_diagonal))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_weighted_loss_is_mean_over_all_pair_terms(inputs):
    """DINOv3 scales: every (student crop, teacher crop, image) term weighs the same."""
    student_global, student_local, _, teacher, _ = inputs
    out = dino_loss(student_global, student_local, teacher, 0.1, ignore_diagonal=True)
    global_terms = reference_pair_terms(student_global, teacher, 0.1, True)
    local_terms = reference_pair_terms(student_local, teacher, 0.1, False)
    np.testing.assert_allclose(float(out.global_crops), np.mean(global_terms), rtol=1e-5)
    np.testing.assert_allclose(float(out.local_crops), np.mean(local_terms), rtol=1e-5)
    np.testing.assert_allclose(float(out.total), np.mean(global_terms + local_terms), rtol=1e-5)
    # Explicit DINOv3 scales: n_g = 2·1 = 2 and n_l = 2·3 = 6 pairs.
    np.testing.assert_allclose(
        float(out.total), 2 / 8 * np.mean(global_terms) + 6 / 8 * np.mean(local_terms), rtol=1e-5)
    only_global = dino_loss(student_global, None, teacher)
    np.testing.assert_allclose(float(only_global.total), np.mean(global_terms), rtol=1e-5)


def test_matches_lightly_with_softmax_centering(inputs):
    """lightly's DINOLoss (softmax centering, same-view pairs skipped) is the same objective.

    lightly averages over all non-diagonal (teacher view, student view) pairs with the global
    views listed first, which equals the DINOv3 global/local weighting; it updates its center
    after computing the loss, as ``update_center`` does.
    """
    lightly_loss = pytest.importorskip("lightly.loss")
    student_global, student_local, teacher_logits, _, center = inputs
    temp = 0.05
    criterion = lightly_loss.DINOLoss(output_dim=K, teacher_temp=temp, student_temp=0.1,
                                center_momentum=0.9)
    criterion.center.data = torch.from_numpy(center.astype(np.float64)).reshape(1, 1, K)
    teacher_t = [torch.from_numpy(t.astype(np.float64)) for t in teacher_logits]
    student_t = [torch.from_numpy(s.astype(np.float64)) for s in (*student_global, *student_local)]
    want = criterion(teacher_t, student_t, teacher_temp=temp).item()

    targets = centering.softmax_center_targets(teacher_logits, center, temp)
    got = dino_loss(student_global, student_local, targets, 0.1, ignore_diagonal=True).total
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    new_center = centering.update_center(center, teacher_logits, 0.9)
    np.testing.assert_allclose(np.asarray(new_center), criterion.center.numpy().reshape(K),
                               rtol=1e-5, atol=1e-6)


def _step(centering_mode):
    """Targets, loss and (softmax) center update, as a train step would compose them."""

    def step(student_global, student_local, teacher_logits, center):
        if centering_mode == "sinkhorn":
            targets = centering.sinkhorn_knopp(teacher_logits, 0.04, 3)
        else:
            targets = centering.softmax_center_targets(teacher_logits, center, 0.04)
        loss = dino_loss(student_global, student_local, targets).total
        return loss, centering.update_center(center, teacher_logits)

    return step


@pytest.mark.parametrize("centering_mode", ["softmax", "sinkhorn"])
def test_sharded_batch_equals_single_device(inputs, batch_sharding, centering_mode):
    student_global, student_local, teacher_logits, _, center = inputs
    args = (student_global, student_local, teacher_logits, center)
    single_device = jax.devices()[0]
    single = jax.jit(_step(centering_mode))(*jax.device_put(args, single_device))
    sharding = batch_sharding(3, 1)
    sharded_args = (*jax.device_put(args[:3], sharding), args[3])
    assert len(sharded_args[0].sharding.device_set) == 8
    sharded = jax.jit(_step(centering_mode))(*sharded_args)
    np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(single[1]), rtol=1e-6, atol=1e-7)


def test_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(1)
    student_global = jnp.asarray(rng.normal(size=(2, 3, 5)))
    student_local = jnp.asarray(rng.normal(size=(2, 3, 5)))
    teacher = centering.sinkhorn_knopp(jnp.asarray(rng.normal(size=(2, 3, 5))), 0.3)
    assert student_global.dtype == jnp.float64 and teacher.dtype == jnp.float64

    def loss(sg, sl):
        return dino_loss(sg, sl, teacher, 0.1).total

    check_grads(loss, (student_global, student_local), order=1, modes=("rev",), eps=1e-5,
                atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_and_bf16_inputs_are_finite(scale):
    rng = np.random.default_rng(2)
    student = scale * rng.uniform(-1, 1, size=(2, 4, 16)).astype(np.float32)
    teacher_logits = scale * rng.uniform(-1, 1, size=(2, 4, 16)).astype(np.float32)
    student[:, 1] = student[:, 0]  # duplicate samples
    for dtype in (jnp.float32, jnp.bfloat16):
        s, t = jnp.asarray(student, dtype), jnp.asarray(teacher_logits, dtype)
        for targets in (centering.sinkhorn_knopp(t, 0.04),
                        centering.softmax_center_targets(t, jnp.zeros(16), 0.04)):
            loss, grad = jax.value_and_grad(lambda x: dino_loss(x, x, targets).total)(s)
            assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
            assert np.all(np.isfinite(np.asarray(grad, dtype=np.float32)))


def test_mismatched_shapes_are_named(inputs):
    student_global, _, _, teacher, _ = inputs
    with pytest.raises(ValueError, match="teacher_probs"):
        dino_cross_entropy(student_global, teacher[:, :4])
    with pytest.raises(ValueError, match="student_logits"):
        dino_cross_entropy(student_global[0], teacher)
