"""Teacher targets: Sinkhorn-Knopp and softmax centering against float64 references and lightly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from braindino_jax.ssl import centering


def reference_softmax_targets(logits, center, temp):
    z = (logits.astype(np.float64) - center) / temp
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def marginal_l1_error(probs: np.ndarray) -> float:
    """L1 distance of the prototype marginal (mean target over samples) from uniform."""
    marginal = probs.reshape(-1, probs.shape[-1]).mean(axis=0)
    return float(np.abs(marginal - 1.0 / probs.shape[-1]).sum())


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(2, 32, 24)).astype(np.float32)


def test_sinkhorn_matches_float64_reference(logits, reference_sinkhorn):
    got = np.asarray(centering.sinkhorn_knopp(logits, 0.07, 3))
    want = reference_sinkhorn(logits.reshape(-1, 24), 0.07, 3).reshape(logits.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)


def test_sinkhorn_matches_lightly(logits):
    """lightly's SwAV Sinkhorn is the same algorithm (ε = teacher temperature)."""
    swav = pytest.importorskip("lightly.loss.swav_loss")
    flat = logits.reshape(-1, 24).astype(np.float64)
    want = swav.sinkhorn(torch.from_numpy(flat), iterations=3, epsilon=0.1).numpy()
    got = np.asarray(centering.sinkhorn_knopp(logits, 0.1, 3)).reshape(-1, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _jitted_sinkhorn(n_iterations, in_sharding=None):
    return jax.jit(lambda t: centering.sinkhorn_knopp(t, 0.5, n_iterations),
                   in_shardings=in_sharding)


@pytest.mark.parametrize("sharded", [False, True])
def test_sinkhorn_is_a_valid_assignment_that_converges(sharded, batch_sharding):
    """Rows sum to 1; the prototype marginal approaches uniform monotonically and reaches it."""
    logits = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    sharding = batch_sharding(2, 0) if sharded else None
    errors = []
    for n in (1, 2, 3, 5, 8):
        probs = np.asarray(_jitted_sinkhorn(n, sharding)(logits))
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
        assert np.all(probs >= 0)
        errors.append(marginal_l1_error(probs))
    initial = marginal_l1_error(np.asarray(jax.nn.softmax(logits / 0.5)))
    assert all(a > b for a, b in zip([initial] + errors, errors)), errors
    converged = np.asarray(_jitted_sinkhorn(200, sharding)(logits))
    marginal = converged.mean(axis=0)
    np.testing.assert_allclose(marginal * 16, 1.0, rtol=1e-3)
    np.testing.assert_allclose(converged.sum(axis=-1), 1.0, rtol=1e-5)


def test_sinkhorn_sharded_equals_single_device(logits, batch_sharding):
    single = centering.sinkhorn_knopp(logits, 0.04, 3)
    sharded = jax.jit(lambda t: centering.sinkhorn_knopp(t, 0.04, 3),
                      in_shardings=batch_sharding(3, 1))(logits)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-7)


def test_sinkhorn_padding_is_ignored(logits, reference_sinkhorn):
    """Invalid samples (the iBOT buffer's padding) change nothing and get zero rows."""
    flat = logits.reshape(-1, 24)
    valid = np.zeros(flat.shape[0], dtype=bool)
    valid[:40] = True
    got = np.asarray(centering.sinkhorn_knopp(flat, 0.07, 3, valid=valid))
    want = reference_sinkhorn(flat[:40], 0.07, 3)
    np.testing.assert_allclose(got[:40], want, rtol=1e-5, atol=1e-7)
    assert np.all(got[40:] == 0)
    none_valid = centering.sinkhorn_knopp(flat, 0.07, 3, valid=np.zeros_like(valid))
    assert np.all(np.asarray(none_valid) == 0)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_and_bf16_logits_stay_finite(scale):
    """The naive exp(t/τ) overflows here (1e4 / 0.04); the log-domain form does not."""
    rng = np.random.default_rng(2)
    logits = scale * rng.uniform(-1, 1, size=(16, 32)).astype(np.float32)
    logits[3] = logits[4]  # duplicate samples
    for x in (jnp.asarray(logits), jnp.asarray(logits, dtype=jnp.bfloat16)):
        probs = centering.sinkhorn_knopp(x, 0.04, 3)
        assert probs.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(probs)))
        np.testing.assert_allclose(np.asarray(probs).sum(axis=-1), 1.0, rtol=1e-4)
        targets = centering.softmax_center_targets(x, jnp.zeros(32), 0.04)
        assert targets.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(targets)))
        center = centering.update_center(jnp.zeros(32), x)
        assert center.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(center)))


def test_softmax_centering_and_center_update_match_reference(logits):
    center = np.random.default_rng(3).normal(size=24).astype(np.float32)
    got = np.asarray(centering.softmax_center_targets(logits, center, 0.04))
    np.testing.assert_allclose(got, reference_softmax_targets(logits, center, 0.04),
                               rtol=1e-5, atol=1e-7)
    new = np.asarray(centering.update_center(center, logits, momentum=0.9))
    want = 0.9 * center.astype(np.float64) + 0.1 * logits.reshape(-1, 24).astype(np.float64).mean(0)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)


def test_center_update_over_valid_tokens_only(logits):
    flat = logits.reshape(-1, 24)
    valid = np.arange(flat.shape[0]) % 3 == 0
    center = np.zeros(24, np.float32)
    got = np.asarray(centering.update_center(center, flat, 0.9, valid=valid))
    np.testing.assert_allclose(got, 0.1 * flat[valid].astype(np.float64).mean(0), rtol=1e-5,
                               atol=1e-7)
    unchanged = centering.update_center(center + 1, flat, 0.9, valid=np.zeros_like(valid))
    np.testing.assert_array_equal(np.asarray(unchanged), center + 1)


def test_center_update_sharded_equals_single_device(logits, batch_sharding):
    center = np.random.default_rng(4).normal(size=24).astype(np.float32)
    single = centering.update_center(center, logits)
    sharded = jax.jit(centering.update_center,
                      in_shardings=(None, batch_sharding(3, 1)))(center, logits)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="center"):
        centering.softmax_center_targets(np.zeros((4, 8)), np.zeros(7), 0.04)
    with pytest.raises(ValueError, match="valid"):
        centering.sinkhorn_knopp(np.zeros((4, 8)), 0.04, valid=np.ones(5, bool))
    with pytest.raises(ValueError, match="n_iterations"):
        centering.sinkhorn_knopp(np.zeros((4, 8)), 0.04, 0)
