"""Classification and regression metrics (scikit-learn), and bootstrap confidence intervals.

A metric that is undefined on a given sample (an AUC over a test set holding one class) is NaN,
never an exception, so one degenerate split or resample does not stop a sweep.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn import metrics
from sklearn.exceptions import UndefinedMetricWarning

LOWER_IS_BETTER = frozenset({"mae", "rmse", "logrank_p"})


def auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC: binary on the positive class, else macro one-vs-rest; NaN when undefined."""
    n_classes = proba.shape[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            if n_classes == 2:
                return float(metrics.roc_auc_score(y_true, proba[:, 1]))
            return float(metrics.roc_auc_score(y_true, proba, multi_class="ovr", average="macro",
                                               labels=np.arange(n_classes)))
    except ValueError:
        return float("nan")


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy, AUC (see ``auc``) and macro F1 of class probabilities [n, K]."""
    pred = np.argmax(proba, axis=1)
    labels = np.arange(proba.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # balanced accuracy with a class absent
        balanced = float(metrics.balanced_accuracy_score(y_true, pred))
    return {
        "accuracy": float(metrics.accuracy_score(y_true, pred)),
        "balanced_accuracy": balanced,
        "auc": auc(y_true, proba),
        "f1_macro": float(metrics.f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
    }


def confusion(y_true: np.ndarray, proba: np.ndarray) -> list[list[int]]:
    """Confusion matrix (rows: true class, columns: predicted), as nested lists for JSON."""
    labels = np.arange(proba.shape[1])
    return metrics.confusion_matrix(y_true, np.argmax(proba, axis=1), labels=labels).tolist()


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² (NaN for fewer than two samples)."""
    r2 = float(metrics.r2_score(y_true, y_pred)) if len(y_true) >= 2 else float("nan")
    return {
        "mae": float(metrics.mean_absolute_error(y_true, y_pred)),
        "rmse": float(metrics.root_mean_squared_error(y_true, y_pred)),
        "r2": r2,
    }


def bootstrap_samples(strata: np.ndarray, n_resamples: int, seed: int) -> list[np.ndarray]:
    """Stratified bootstrap: per stratum (in sorted order), row indices [n_resamples, n_stratum]
    drawn with replacement within it. Strata keep their sizes, so every resample of an AUC has
    both classes and the resampled arrays stay rectangular (vectorised statistics)."""
    rng = np.random.default_rng(seed)
    return [rows[rng.integers(0, len(rows), size=(n_resamples, len(rows)))]
            for rows in (np.flatnonzero(strata == s) for s in np.unique(strata))]


def _resampled_auc(y: np.ndarray, proba: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """AUC of each stratified resample, as the Mann–Whitney U statistic / (n_pos * n_neg) of
    the positive class (binary) or averaged over classes one-vs-rest (macro), which is the
    value ``roc_auc_score`` gives; classes absent from the test set make it NaN."""
    n_classes = proba.shape[1]
    if len(np.unique(y)) < n_classes:
        return np.full(n_resamples, np.nan)
    blocks = bootstrap_samples(y, n_resamples, seed)  # one block per class, in class order
    classes = [1] if n_classes == 2 else range(n_classes)
    per_class = []
    for k in classes:
        scores = proba[:, k]
        positives = scores[blocks[k]]
        negatives = scores[np.concatenate([b for j, b in enumerate(blocks) if j != k], axis=1)]
        u = stats.mannwhitneyu(positives, negatives, axis=1, method="asymptotic").statistic
        per_class.append(u / (positives.shape[1] * negatives.shape[1]))
    return np.mean(per_class, axis=0)


def bootstrap_ci(
    metric: str,
    targets: np.ndarray,
    predictions: np.ndarray,
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of a headline metric over resampled test rows.

    ``metric``: "auc" (classes resampled within themselves; ``predictions`` are probabilities),
    "mae", "c_index" (``targets`` [n, 2] time and event; resampled within event status) or
    "mean" (of ``predictions``, e.g. per-volume Dice). Resamples where the metric is undefined
    are dropped; (NaN, NaN) when none is left or ``n_resamples`` is 0.
    """
    if n_resamples == 0 or len(targets) == 0:
        return float("nan"), float("nan")
    if metric == "auc":
        values = _resampled_auc(targets, predictions, n_resamples, seed)
    elif metric == "c_index":
        from braindino_jax.probes.survival import c_index

        index = np.concatenate(bootstrap_samples(targets[:, 1], n_resamples, seed), axis=1)
        values = np.array([c_index(targets[i, 0], targets[i, 1], predictions[i]) for i in index])
    else:
        index = bootstrap_samples(np.zeros(len(targets)), n_resamples, seed)[0]
        if metric == "mae":
            values = metrics.mean_absolute_error(targets[index].T, predictions[index].T, multioutput="raw_values")
        elif metric == "mean":
            values = np.nanmean(predictions[index], axis=1)
        else:
            raise ValueError(f"metric: expected auc, mae, c_index or mean, got {metric!r}")
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)
