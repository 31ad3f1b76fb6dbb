"""KoLeo: float64 reference, lightly, per-device-group semantics under sharding, duplicates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from braindino_jax.ssl.koleo import koleo_loss

EPS = 1e-8


def reference_koleo_terms(x: np.ndarray) -> np.ndarray:
    """−log(nearest-neighbour distance + eps) per sample of one set [n, D], float64."""
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)
    terms = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        j = others[int(np.argmax([x[i] @ x[o] for o in others]))]
        terms.append(-np.log(np.linalg.norm(x[i] - x[j] + EPS) + EPS))
    return np.array(terms)


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).normal(size=(2, 16, 12)).astype(np.float32)


def test_matches_float64_reference_and_lightly(features):
    got = koleo_loss(features)
    want = np.mean([reference_koleo_terms(crop) for crop in features])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    lightly = pytest.importorskip("lightly.loss").KoLeoLoss(eps=EPS)
    per_crop = [lightly(torch.from_numpy(c.astype(np.float64))).item() for c in features]
    np.testing.assert_allclose(float(got), np.mean(per_crop), rtol=1e-5)


def test_value_times_crop_count_is_dinov3s_sum_over_global_crops(features):
    """DINOv3 adds 0.1 · n_global_crops · (crop mean): the caller's 0.1 · G · koleo_loss."""
    per_crop = [reference_koleo_terms(crop).mean() for crop in features]  # KoLeoLoss per crop
    np.testing.assert_allclose(features.shape[0] * float(koleo_loss(features)), sum(per_crop),
                               rtol=1e-5)


def test_groups_search_neighbours_within_each_group_only(features):
    got = koleo_loss(features, group_size=4)
    want = np.mean([reference_koleo_terms(crop[g:g + 4])
                    for crop in features for g in (0, 4, 8, 12)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Neighbours are nearer in a larger set, so −log distance and the global-batch value are
    # larger: the two semantics really differ.
    assert float(koleo_loss(features)) > float(got) + 0.1


def test_sharded_batch_keeps_per_device_semantics(features, batch_sharding):
    """With group_size = batch / 8, each device's shard is one KoLeo set, as in DINOv2."""
    x = jax.device_put(features, batch_sharding(3, 1))
    fn = jax.jit(lambda f: koleo_loss(f, group_size=2))
    got = fn(x)
    # Each group stays on its device: no features are gathered across devices.
    assert "all-gather" not in fn.lower(x).compile().as_text()
    per_device = []
    for shard in x.addressable_shards:
        local = np.asarray(shard.data)
        assert local.shape == (2, 2, 12)
        per_device.extend(reference_koleo_terms(crop) for crop in local)
    np.testing.assert_allclose(float(got), np.mean(per_device), rtol=1e-5)
    np.testing.assert_allclose(float(got), float(koleo_loss(features, group_size=2)), rtol=1e-6)


def test_duplicates_give_large_finite_loss_and_gradient():
    x = np.random.default_rng(1).normal(size=(8, 32)).astype(np.float32)
    x[1] = x[0]
    x[5] = 3 * x[4]  # same direction: identical after normalisation
    for dtype, scale in ((jnp.float32, 1.0), (jnp.bfloat16, 1.0), (jnp.float32, 1e4)):
        loss, grad = jax.value_and_grad(koleo_loss)(jnp.asarray(scale * x, dtype))
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
        assert np.all(np.isfinite(np.asarray(grad, dtype=np.float32)))
    all_same = koleo_loss(jnp.ones((4, 768)))
    assert 15.0 < float(all_same) < 20.0  # −log(eps·sqrt(768) + eps) ≈ 18.1


def test_gradient_matches_finite_differences(x64):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5)))
    check_grads(lambda f: koleo_loss(f, group_size=3), (x,), order=1, modes=("rev",), eps=1e-6,
                atol=1e-6, rtol=1e-6)


def test_bad_group_size_is_named(features):
    with pytest.raises(ValueError, match="group_size"):
        koleo_loss(features, group_size=5)
    with pytest.raises(ValueError, match="features"):
        koleo_loss(jnp.zeros(8))
