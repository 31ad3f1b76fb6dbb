"""Collapse diagnostics on the three regimes they must tell apart: healthy, uniform, one-hot."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from braindino_jax.ssl import diagnostics

K = 16


def test_uniform_collapse():
    probs = np.full((8, K), 1.0 / K, np.float32)
    assert float(diagnostics.target_entropy(probs)) == pytest.approx(math.log(K), rel=1e-6)
    assert float(diagnostics.effective_prototypes(probs)) == pytest.approx(K, rel=1e-5)


def test_one_hot_collapse_onto_one_prototype():
    probs = np.zeros((8, K), np.float32)
    probs[:, 3] = 1.0
    assert float(diagnostics.target_entropy(probs)) == 0.0
    assert float(diagnostics.effective_prototypes(probs)) == pytest.approx(1.0)


def test_healthy_sharp_and_spread_targets():
    probs = np.eye(K, dtype=np.float32)[np.arange(8) % 4]  # one-hot over 4 prototypes, equally
    assert float(diagnostics.target_entropy(probs)) == 0.0
    assert float(diagnostics.effective_prototypes(probs)) == pytest.approx(4.0, rel=1e-6)


def test_values_match_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, K))
    teacher = np.exp(2 * logits) / np.exp(2 * logits).sum(-1, keepdims=True)
    student = rng.normal(size=(2, 8, K))
    features = rng.normal(size=(8, 6))
    center = rng.normal(size=K)
    out = diagnostics.collapse_diagnostics(teacher.astype(np.float32), student.astype(np.float32),
                                           features.astype(np.float32), jnp.float32(0.25), center)

    q = teacher.reshape(-1, K)
    log_p = student.reshape(-1, K) / 0.1
    log_p = log_p - log_p.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    entropy = -np.sum(q * np.log(q), axis=-1).mean()
    mean_q = q.mean(0)
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    want = {
        "target_entropy": entropy,
        "target_entropy_ratio": entropy / math.log(K),
        "student_teacher_kl": np.sum(q * (np.log(q) - log_p), axis=-1).mean(),
        "effective_prototypes": np.exp(-np.sum(mean_q * np.log(mean_q))),
        "koleo": 0.25,
        "feature_std": unit.std(axis=0).mean(),
        "center_norm": np.linalg.norm(center),
    }
    assert set(out) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(float(out[name]), value, rtol=2e-5, err_msg=name)


def test_feature_std_is_zero_for_collapsed_features():
    features = np.tile(np.random.default_rng(1).normal(size=(1, 6)), (8, 1))
    assert float(diagnostics.feature_std(features)) < 1e-6


def test_kl_is_zero_when_student_matches_teacher():
    logits = np.random.default_rng(2).normal(size=(4, K)).astype(np.float32)
    teacher = np.exp(logits / 0.1) / np.exp(logits / 0.1).sum(-1, keepdims=True)
    assert abs(float(diagnostics.student_teacher_kl(logits, teacher, 0.1))) < 1e-5
    with pytest.raises(ValueError, match="student_logits"):
        diagnostics.student_teacher_kl(logits[:2], teacher)
