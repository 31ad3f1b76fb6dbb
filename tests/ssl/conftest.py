"""Shared fixtures for the SSL loss tests: the 8-device mesh and a float64 scope."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.special import logsumexp


@pytest.fixture(scope="session")
def mesh() -> Mesh:
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py should provide 8 host CPU devices"
    return Mesh(np.array(devices).reshape(2, 4), ("data", "fsdp"))


@pytest.fixture(scope="session")
def batch_sharding(mesh):
    """Shard axis ``axis`` of an array over all 8 devices, as the train step shards the batch."""

    def sharding(ndim: int, axis: int) -> NamedSharding:
        spec = [None] * ndim
        spec[axis] = ("data", "fsdp")
        return NamedSharding(mesh, P(*spec))

    return sharding


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test (gradient checks against finite differences)."""
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # older JAX kept it in jax.experimental
        from jax.experimental import enable_x64 as enable
    with enable(True):
        yield


def _reference_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """DINOv2's Sinkhorn-Knopp, literally, in float64: Q is [K, B], rows are prototypes."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


@pytest.fixture(scope="session")
def reference_sinkhorn():
    """The float64 reference Sinkhorn-Knopp, [B, K] logits -> [B, K] targets."""
    return _reference_sinkhorn


def _reference_sinkhorn_log(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """The same iterates in the log domain, float64: exact where exp(t/τ) overflows float64."""
    log_q = logits.astype(np.float64) / temp
    for _ in range(n_iterations):
        log_q = log_q - logsumexp(log_q, axis=0, keepdims=True)
        log_q = log_q - logsumexp(log_q, axis=1, keepdims=True)
    return np.exp(log_q)


@pytest.fixture(scope="session")
def reference_sinkhorn_log():
    """The float64 log-domain reference Sinkhorn-Knopp, [B, K] logits -> [B, K] targets."""
    return _reference_sinkhorn_log
