"""iBOT masked-patch loss: static gather, float64 reference, lightly, sharding, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax
import torch
from jax.test_util import check_grads

from braindino_jax.data import masking
from braindino_jax.ssl import centering
from braindino_jax.ssl.ibot import gather_tokens, ibot_loss, masked_token_indices

B, GRID, K = 16, (4, 4), 32
N = GRID[0] * GRID[1]


def reference_ibot(student, teacher_probs, masks, student_temp):
    """Per image: mean cross-entropy over its masked tokens; then the mean over all images."""
    log_p = log_softmax(student.astype(np.float64) / student_temp, axis=-1)
    per_image = []
    for b in range(masks.shape[0]):
        ce = [-np.sum(teacher_probs[b, n] * log_p[b, n]) for n in range(N) if masks[b, n]]
        per_image.append(np.mean(ce) if ce else 0.0)
    return np.mean(per_image)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    masks = masking.sample_masks(rng, B, GRID, 0.5, (0.1, 0.5))
    assert masks.any(axis=1).sum() == B // 2
    student = rng.normal(size=(B, N, K)).astype(np.float32)
    teacher_logits = rng.normal(size=(B, N, K)).astype(np.float32)
    bound = masking.max_masked_tokens(B, GRID)
    return masks, student, teacher_logits, bound


def test_indices_and_weights_match_bruteforce(batch):
    masks, _, _, bound = batch
    indices, weights = jax.jit(masked_token_indices, static_argnums=1)(masks, bound)
    assert indices.shape == weights.shape == (bound,)
    assert indices.dtype == jnp.int32 and weights.dtype == jnp.float32
    expected = [(b * N + t, 1.0 / masks[b].sum())
                for b in range(B) for t in range(N) if masks[b, t]]
    n = len(expected)
    np.testing.assert_array_equal(np.asarray(indices[:n]), [e[0] for e in expected])
    np.testing.assert_allclose(np.asarray(weights[:n]), [e[1] for e in expected], rtol=1e-7)
    assert np.all(np.asarray(weights[n:]) == 0)
    # Each masked image carries total weight 1.
    np.testing.assert_allclose(float(weights.sum()), (masks.sum(axis=1) > 0).sum(), rtol=1e-6)


def _targets_and_loss(masks, student, teacher_logits, bound, mode, center):
    indices, weights = masked_token_indices(masks, bound)
    s = gather_tokens(student, indices)
    t = gather_tokens(teacher_logits, indices)
    if mode == "sinkhorn":
        targets = centering.sinkhorn_knopp(t, 0.05, 3, valid=weights > 0)
    else:
        targets = centering.softmax_center_targets(t, center, 0.05)
    loss = ibot_loss(s, targets, weights, masks.shape[0], 0.1)
    return loss, centering.update_center(center, t, 0.9, valid=weights > 0), targets, weights


def test_matches_float64_reference_with_sinkhorn(batch, reference_sinkhorn):
    masks, student, teacher_logits, bound = batch
    loss, _, targets, weights = _targets_and_loss(masks, student, teacher_logits, bound,
                                                  "sinkhorn", jnp.zeros(K))
    # Reference targets: Sinkhorn over exactly the masked tokens, scattered back to [B, N, K].
    flat_targets = reference_sinkhorn(teacher_logits[masks], 0.05, 3)
    dense = np.zeros((B, N, K))
    dense[masks] = flat_targets
    n_masked = int(masks.sum())
    np.testing.assert_allclose(np.asarray(targets)[:n_masked], flat_targets, rtol=1e-5, atol=1e-7)
    want = reference_ibot(student, dense, masks, 0.1)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_matches_lightly_with_softmax_centering(batch):
    lightly_loss = pytest.importorskip("lightly.loss")
    masks, student, teacher_logits, bound = batch
    center = np.random.default_rng(1).normal(size=K).astype(np.float32)
    criterion = lightly_loss.IBOTPatchLoss(output_dim=K, teacher_temp=0.05, student_temp=0.1,
                                     center_momentum=0.9)
    criterion.center.center = torch.from_numpy(center.astype(np.float64)).reshape(1, K)
    want = criterion(torch.from_numpy(teacher_logits[masks].astype(np.float64)),
                     torch.from_numpy(student[masks].astype(np.float64)),
                     torch.from_numpy(masks.reshape(B, *GRID))).item()
    loss, new_center, _, _ = _targets_and_loss(masks, student, teacher_logits, bound, "softmax",
                                               center)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_center), criterion.center.value.numpy().reshape(K),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "sinkhorn"])
def test_buffer_padding_does_not_change_the_loss(batch, mode):
    masks, student, teacher_logits, bound = batch
    center = jnp.zeros(K)
    tight = _targets_and_loss(masks, student, teacher_logits, int(masks.sum()), mode, center)
    padded = _targets_and_loss(masks, student, teacher_logits, bound + 37, mode, center)
    np.testing.assert_allclose(float(padded[0]), float(tight[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(padded[1]), np.asarray(tight[1]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["softmax", "sinkhorn"])
def test_sharded_batch_equals_single_device(batch, batch_sharding, mode):
    masks, student, teacher_logits, bound = batch
    center = np.random.default_rng(2).normal(size=K).astype(np.float32)

    def step(m, s, t, c):
        return _targets_and_loss(m, s, t, bound, mode, c)[:2]

    args = (masks, student, teacher_logits)
    single = jax.jit(step)(*jax.device_put(args, jax.devices()[0]), center)
    sharded_args = (jax.device_put(masks, batch_sharding(2, 0)),
                    *jax.device_put(args[1:], batch_sharding(3, 0)))
    assert len(sharded_args[1].sharding.device_set) == 8
    sharded = jax.jit(step)(*sharded_args, center)
    np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(single[1]), rtol=1e-6, atol=1e-7)


def test_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(3)
    student = jnp.asarray(rng.normal(size=(6, 7)))
    targets = centering.sinkhorn_knopp(jnp.asarray(rng.normal(size=(6, 7))), 0.3)
    weights = jnp.asarray([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 0.0])
    check_grads(lambda s: ibot_loss(s, targets, weights, 4, 0.1), (student,), order=1,
                modes=("rev",), eps=1e-5, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_and_bf16_inputs_are_finite(scale):
    rng = np.random.default_rng(4)
    logits = scale * rng.uniform(-1, 1, size=(8, 16)).astype(np.float32)
    weights = jnp.asarray([0.25] * 4 + [0.5] * 2 + [0.0] * 2)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(logits, dtype)
        targets = centering.sinkhorn_knopp(x, 0.04, valid=weights > 0)
        loss, grad = jax.value_and_grad(lambda s: ibot_loss(s, targets, weights, 3))(x)
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
        assert np.all(np.isfinite(np.asarray(grad, dtype=np.float32)))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="masks"):
        masked_token_indices(jnp.zeros((2, 4), jnp.int32), 4)
    with pytest.raises(ValueError, match="weights"):
        ibot_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)), jnp.zeros(3), 2)
    with pytest.raises(ValueError, match="n_images"):
        ibot_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)), jnp.zeros(4), 0)
