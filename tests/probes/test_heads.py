"""Heads on synthetic features with known structure, the Cox loss against references, metrics."""

import numpy as np
import pytest
from flax import nnx
from scipy.special import erf
from sklearn.metrics import roc_auc_score

from braindino_jax.probes import metrics
from braindino_jax.probes.heads import (MLPHead, ProbeNet, TrainSettings, knn_predict, make_objective, predict,
                                        standardize, train_head)
from braindino_jax.probes.survival import c_index, cox_loss

FAST = TrainSettings(learning_rate=1e-2, weight_decay=1e-4, epochs=300, patience=50)


def fit(kind, task_type, x, y, n_train, n_val, n_classes=0, settings=FAST, attention=False, seed=0):
    objective = make_objective(task_type, y[:n_train], n_classes)
    tr, va, te = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    xs = standardize(x[tr], x[va], x[te])
    net = ProbeNet(kind, x.shape[-1], objective.out_dim, attention=attention, rngs=nnx.Rngs(seed))
    net, _ = train_head(net, objective, (xs[0], y[tr]), (xs[1], y[va]),
                        TrainSettings(**{**settings.__dict__, "seed": seed}))
    return objective, predict(net, objective, xs[2]), y[te]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_separable_classes_give_auc_one(kind):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150).astype(np.int32)
    x = rng.normal(size=(150, 24)).astype(np.float32)
    x[:, :3] += 6.0 * np.eye(3)[y]  # one well-separated direction per class
    objective, proba, y_test = fit(kind, "classification", x, y, 90, 30, n_classes=3)
    values = objective.metrics(y_test, proba)
    assert values["auc"] == 1.0 and values["accuracy"] == 1.0 and values["f1_macro"] == 1.0
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


def test_mlp_head_is_layernorm_linear_d_d_exact_gelu_linear_k():
    head = MLPHead(6, 3, rngs=nnx.Rngs(0))
    assert head.fc1.kernel.shape == (6, 6) and head.fc2.kernel.shape == (6, 3)  # hidden = d
    rng = np.random.default_rng(0)
    head.fc2.kernel[...] = rng.normal(size=(6, 3)).astype(np.float32)  # zero at init
    head.fc2.bias[...] = rng.normal(size=3).astype(np.float32)
    head.norm.scale[...] = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    x = rng.normal(size=(4, 6)).astype(np.float32) * 3 + 1
    ln = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + head.norm.epsilon)
    ln = ln * np.asarray(head.norm.scale[...]) + np.asarray(head.norm.bias[...])
    h = ln @ np.asarray(head.fc1.kernel[...]) + np.asarray(head.fc1.bias[...])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU
    expected = h @ np.asarray(head.fc2.kernel[...]) + np.asarray(head.fc2.bias[...])
    np.testing.assert_allclose(np.asarray(head(x)), expected, rtol=1e-5, atol=1e-5)


def test_training_keeps_the_best_val_epoch_and_stops_after_patience():
    """Random labels in 32 dimensions: the head overfits, val stops improving, and the net
    returned is the best val epoch's, not the last one's."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(100, 32)).astype(np.float32)
    y = rng.integers(0, 2, 100).astype(np.int32)
    objective = make_objective("classification", y[:60], 2)
    net = ProbeNet("mlp", 32, 2, rngs=nnx.Rngs(0))
    settings = TrainSettings(learning_rate=3e-2, weight_decay=0.0, epochs=400, patience=5)
    net, run = train_head(net, objective, (x[:60], y[:60]), (x[60:], y[60:]), settings)
    assert run["epochs_run"] == run["best_epoch"] + 5 < 400
    assert objective.score(y[60:], predict(net, objective, x[60:])) == run["val_score"]


def test_attention_pooling_finds_the_informative_slice():
    """The label lives in one slice out of 16 (its position varies): mean pooling dilutes it,
    attention pooling learns to weigh it."""
    rng = np.random.default_rng(1)
    n, slices, dim = 160, 16, 8
    y = rng.integers(0, 2, n).astype(np.int32)
    x = rng.normal(size=(n, 1, slices, dim)).astype(np.float32)
    where = rng.integers(0, slices, n)
    x[np.arange(n), 0, where, 0] = 8.0  # a marker feature saying "this is the slice"
    x[np.arange(n), 0, where, 1] = np.where(y == 1, 3.0, -3.0)
    settings = TrainSettings(learning_rate=1e-2, weight_decay=0.0, epochs=150, patience=150)
    objective, proba, y_test = fit("mlp", "classification", x, y, 100, 30, n_classes=2, settings=settings,
                                   attention=True)
    assert objective.metrics(y_test, proba)["auc"] > 0.95


def test_random_labels_give_auc_near_one_half_over_seeds():
    aucs = []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        x = rng.normal(size=(160, 16)).astype(np.float32)
        y = rng.integers(0, 2, 160).astype(np.int32)
        objective, proba, y_test = fit("linear", "classification", x, y, 80, 30, n_classes=2, seed=seed)
        aucs.append(objective.metrics(y_test, proba)["auc"])
    assert abs(np.mean(aucs) - 0.5) < 0.08, aucs
    assert np.std(aucs) > 0.02  # the seeds differ


def test_regression_on_the_original_scale_with_log1p():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    days = np.expm1(2.0 + 0.8 * x[:, 0])  # log1p(target) is linear in the features
    objective = make_objective("regression", days[:120], log1p=True)
    xs = standardize(x[:120], x[120:160], x[160:])
    net = ProbeNet("linear", 8, 1, rngs=nnx.Rngs(0))
    net, _ = train_head(net, objective, (xs[0], days[:120]), (xs[1], days[120:160]),
                        TrainSettings(learning_rate=3e-2, weight_decay=0.0, epochs=300, patience=300))
    values = objective.metrics(days[160:], predict(net, objective, xs[2]))
    assert values["r2"] > 0.99 and values["mae"] < 0.05 * np.mean(days[160:])


def _breslow_reference(risk, time, event):
    """Negative Breslow partial log-likelihood per event, written as the textbook sum."""
    total = 0.0
    for i in np.flatnonzero(event):
        at_risk = time >= time[i]
        total += risk[i] - np.log(np.sum(np.exp(risk[at_risk])))
    return -total / event.sum()


def test_cox_loss_matches_the_breslow_formula_with_ties_and_ignores_padding():
    rng = np.random.default_rng(3)
    time = rng.integers(1, 8, 40).astype(np.float64)  # many ties
    event = (rng.random(40) < 0.7).astype(np.float64)
    risk = rng.normal(size=40)
    expected = _breslow_reference(risk, time, event)
    got = float(cox_loss(risk, time, event, np.ones(40)))
    assert got == pytest.approx(expected, rel=1e-5)
    padded = [np.concatenate([a, fill]) for a, fill in
              ((risk, rng.normal(size=8) * 50), (time, np.zeros(8)), (event, np.ones(8)))]
    weight = np.concatenate([np.ones(40), np.zeros(8)])
    assert float(cox_loss(*padded, weight)) == pytest.approx(expected, rel=1e-5)


def test_cox_loss_equals_lifelines_partial_likelihood_without_ties():
    from lifelines import CoxPHFitter
    import pandas as pd

    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 2))
    time = rng.exponential(np.exp(-x @ np.array([0.8, -0.5])))
    event = (rng.random(60) < 0.8).astype(float)
    fitter = CoxPHFitter().fit(pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "T": time, "E": event}), "T", "E")
    risk = x @ fitter.params_.values
    ours = float(cox_loss(risk, time, event, np.ones(60)))
    assert -ours * event.sum() == pytest.approx(fitter.log_likelihood_, rel=1e-5)


def test_cox_head_on_a_monotone_risk_has_c_index_one():
    rng = np.random.default_rng(5)
    risk_feature = rng.normal(size=(120, 1)).astype(np.float32)
    time = np.exp(-2.0 * risk_feature[:, 0])  # higher risk → earlier event, strictly
    targets = np.stack([time, np.ones(120)], axis=1)
    settings = TrainSettings(learning_rate=1e-2, weight_decay=0.0, epochs=100, patience=100)
    objective, risk, y_test = fit("linear", "survival", risk_feature, targets, 60, 20, settings=settings)
    values = objective.metrics(y_test, risk)
    assert values["c_index"] == 1.0 and values["logrank_p"] < 0.01
    assert c_index(y_test[:, 0], y_test[:, 1], -risk) == 0.0  # the opposite ranking
    # Among noise features the risk is still found, if not to the last pair.
    x = np.concatenate([risk_feature, rng.normal(size=(120, 5)).astype(np.float32)], axis=1)
    longer = TrainSettings(learning_rate=1e-2, weight_decay=0.0, epochs=300, patience=300)
    objective, risk, y_test = fit("linear", "survival", x, targets, 60, 20, settings=longer)
    assert objective.metrics(y_test, risk)["c_index"] > 0.95


def test_knn_uses_cosine_neighbours():
    objective = make_objective("classification", np.array([0, 1]), 2)
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    # [10, 1] is far from [1, 0] in L2 but almost parallel to it.
    proba = knn_predict(objective, train, np.array([0, 1]), np.array([[10.0, 1.0], [0.1, 5.0]]), k=1)
    np.testing.assert_array_equal(proba, [[1, 0], [0, 1]])


def test_bootstrap_auc_resamples_match_sklearn():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 45)
    proba = rng.dirichlet(np.ones(3), 45)
    proba[np.arange(45), y] += 0.4
    proba /= proba.sum(axis=1, keepdims=True)
    resampled = metrics._resampled_auc(y, proba, 30, seed=7)
    index = np.concatenate(metrics.bootstrap_samples(y, 30, 7), axis=1)
    expected = [roc_auc_score(y[i], proba[i], multi_class="ovr", average="macro") for i in index]
    np.testing.assert_allclose(resampled, expected, rtol=1e-12)
    lo, hi = metrics.bootstrap_ci("auc", y, proba, 500, seed=0)
    assert lo < metrics.auc(y, proba) < hi
    assert metrics.bootstrap_ci("auc", y, proba, 500, seed=0) == (lo, hi)
