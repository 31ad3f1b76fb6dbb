"""Teacher targets: Sinkhorn-Knopp and softmax centering against float64 references and lightly,
their precision at extreme logits, and their compiled collectives on a sharded batch."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

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


def _relative_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |error| / max target, max relative error on the targets above 0.01)."""
    error = np.abs(got.astype(np.float64) - want)
    large = want > 0.01
    return float(error.max() / want.max()), float((error[large] / want[large]).max())


TAU = 0.04
_NOISE = np.random.default_rng(5).normal(size=(64, 96))
# |logit| / τ ≈ 1e4 (logits near 400 at τ = 0.04), with targets that are not one-hot.
EXTREME = {
    "common offset": 400 + 3 * TAU * _NOISE,
    "negative offset": -400 + 3 * TAU * _NOISE,
    "offset per prototype": np.random.default_rng(6).uniform(-400, 400, 96) + 3 * TAU * _NOISE,
    "spread": 400 * np.random.default_rng(7).uniform(-1, 1, (64, 96)),
}


def test_log_domain_reference_is_the_literal_reference(logits, reference_sinkhorn,
                                                       reference_sinkhorn_log):
    flat = logits.reshape(-1, 24)
    np.testing.assert_allclose(reference_sinkhorn_log(flat, 0.07, 3),
                               reference_sinkhorn(flat, 0.07, 3), rtol=1e-12)


@pytest.mark.parametrize("case", list(EXTREME))
def test_sinkhorn_is_precise_at_extreme_logits(case, reference_sinkhorn_log):
    """The max shift comes before τ divides: a relative error <= 1e-5 at |logit| / τ ≈ 1e4
    (the unshifted form was off by 1e-4..1e-3 on these).

    An entry far below its prototype's maximum keeps float32's spacing of |t - max| / τ, so
    with logits spread over ±1e4 τ a few targets above 0.01 of this draw see 1.3e-5.
    """
    logits = EXTREME[case].astype(np.float32)
    bound = 3e-5 if case == "spread" else 1e-5
    got = np.asarray(centering.sinkhorn_knopp(logits, TAU, 3))
    want = reference_sinkhorn_log(logits, TAU, 3)
    assert (want > 0.01).sum() >= 64  # real distributions, not only one-hot rows
    of_max, relative = _relative_error(got, want)
    assert of_max <= 1e-5 and relative <= bound, (of_max, relative)
    # The same with padding: shifts and sums over the valid samples only.
    valid = np.arange(64) < 40
    padded = np.asarray(centering.sinkhorn_knopp(logits, TAU, 3, valid=valid))
    of_max, relative = _relative_error(padded[:40], reference_sinkhorn_log(logits[:40], TAU, 3))
    assert of_max <= 1e-5 and relative <= bound, (of_max, relative)


@pytest.mark.parametrize("case", ["logits far above the center", "center far above the logits",
                                  "both far, apart", "spread"])
def test_softmax_centering_is_precise_when_the_center_is_far(case):
    rng = np.random.default_rng(8)
    small = lambda *shape: 3 * TAU * rng.normal(size=shape)  # noqa: E731
    logits, center = {
        "logits far above the center": (400 + small(64, 96), small(96)),
        "center far above the logits": (small(64, 96), 400 + small(96)),
        "both far, apart": (-300 + small(64, 96), 200 + small(96)),
        "spread": (400 * rng.uniform(-1, 1, (64, 96)), small(96)),
    }[case]
    logits, center = logits.astype(np.float32), center.astype(np.float32)
    got = np.asarray(centering.softmax_center_targets(logits, center, TAU))
    want = reference_softmax_targets(logits, center.astype(np.float64), TAU)
    of_max, relative = _relative_error(got, want)
    assert of_max <= 1e-5 and relative <= 1e-5, (of_max, relative)


def _collectives(hlo: str) -> dict[str, list[int]]:
    """Element counts of the results of each collective in optimized HLO text."""
    found: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|"
                          r"reduce-scatter)(-start)?\(", line)
        if match:
            sizes = [math.prod(int(d) for d in dims.split(",") if d)
                     for dims in re.findall(r"\[([\d,]*)\]", match.group(1))]
            found.setdefault(match.group(2), []).extend(sizes)
    return found


def _functions(k):
    center = jax.device_put(np.random.default_rng(9).normal(size=k).astype(np.float32))
    return {
        "sinkhorn_knopp": lambda t, v: centering.sinkhorn_knopp(t, TAU, 3, valid=v),
        "softmax_center_targets": lambda t, v: centering.softmax_center_targets(t, center, TAU),
        "update_center": lambda t, v: centering.update_center(center, t, 0.9, valid=v),
    }


@pytest.mark.parametrize("name", ["sinkhorn_knopp", "softmax_center_targets", "update_center"])
@pytest.mark.parametrize("layout", ["dino [crops, batch, K]", "ibot buffer [M, K]"])
def test_sharded_batch_is_never_gathered(name, layout, mesh):
    """Compiled on 8 devices with the batch axis split, as the train step calls them: no
    device receives the others' logits; the only collectives are all-reduces of [K] sums."""
    k = 64
    rng = np.random.default_rng(10)
    if layout.startswith("dino"):
        logits, valid = rng.normal(size=(2, 16, k)).astype(np.float32), None
        spec, valid_spec = P(None, ("data", "fsdp")), None
    else:
        logits, valid = rng.normal(size=(40, k)).astype(np.float32), np.arange(40) < 29
        spec, valid_spec = P(("data", "fsdp")), P(("data", "fsdp"))
    sharding = NamedSharding(mesh, spec)
    args = (jax.device_put(logits, sharding),
            None if valid is None else jax.device_put(valid, NamedSharding(mesh, valid_spec)))
    fn = _functions(k)[name]
    compiled = jax.jit(fn).lower(*args).compile()
    collectives = _collectives(compiled.as_text())
    assert set(collectives) <= {"all-reduce"}, collectives
    assert all(size <= k for size in collectives.get("all-reduce", [])), collectives
    if name != "softmax_center_targets":  # a per-sample op needs no collective at all
        assert collectives.get("all-reduce"), "the batch statistics must be reduced globally"
    got = compiled(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(fn)(logits, valid)),
                               rtol=1e-5, atol=1e-6)
    if name != "update_center":
        assert got.sharding.is_equivalent_to(sharding, logits.ndim)


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
