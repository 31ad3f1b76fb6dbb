"""Probe heads on cached features, trained with optax: linear, BrainDINO's MLP, and kNN.

- ``linear``: one Linear layer with an L2 penalty on its weights, i.e. multinomial logistic
  regression, ridge regression, or a linear Cox model, depending on the objective.
- ``mlp``: LN -> Linear(d, d) -> GELU -> Linear(K), as in BrainDINO (same L2 penalty).
- ``knn``: scikit-learn's k-nearest neighbours under the cosine distance, k chosen on val.

Training runs whole epochs as one jitted ``lax.scan`` over minibatches (a Cox objective uses
the full batch: its risk sets span the training set). After every epoch the head is scored on
val; the best epoch is kept and training stops after ``patience`` epochs without improvement.
Learning rate and penalty are traced arguments, so a grid over them compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from braindino_jax.probes import metrics
from braindino_jax.probes.aggregation import AttentionPool, fuse_modalities
from braindino_jax.probes.early_stopping import EarlyStopping
from braindino_jax.probes.survival import c_index, cox_loss, survival_metrics

# ----------------------------------------------------------------------------------------------
# Modules


_zeros = nnx.initializers.zeros_init()


class LinearHead(nnx.Module):
    """Zero-initialised, so training starts from uniform predictions with no random ranking."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_dim, out_dim, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x)


class MLPHead(nnx.Module):
    """LN -> Linear(d, hidden) -> exact GELU -> Linear(out); hidden = d as in BrainDINO; the
    output layer starts at zero like the linear head."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, *, rngs: nnx.Rngs):
        hidden = hidden or in_dim
        self.norm = nnx.LayerNorm(in_dim, rngs=rngs)
        self.fc1 = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out_dim, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(self.norm(x)), approximate=False))


class ProbeNet(nnx.Module):
    """Optional attention pooling over slices and modality fusion, then the head."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, *, attention: bool = False,
                 n_modalities: int = 1, fusion: str = "average", rngs: nnx.Rngs):
        self.fusion = fusion
        self.pool = AttentionPool(in_dim, rngs=rngs) if attention else None
        head_dim = in_dim * n_modalities if attention and fusion == "concat" else in_dim
        self.head = (MLPHead if kind == "mlp" else LinearHead)(head_dim, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, F] features, or [B, M, N, D] slices when attention-pooled; float32 outputs [B, K]."""
        if self.pool is not None:
            x = fuse_modalities(self.pool(x), self.fusion)
        return self.head(x).astype(jnp.float32)


def _kernel_penalty(state: nnx.State) -> jax.Array:
    """½ Σ‖W‖² over the head's weight matrices (biases, norms and pooling left out)."""
    pure = nnx.to_pure_dict(state)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(pure["head"])
               if jax.tree_util.keystr(path).endswith("['kernel']")]
    return 0.5 * sum(jnp.sum(k * k) for k in kernels)


# ----------------------------------------------------------------------------------------------
# Objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a head predicts and how it is scored.

    ``type``: classification (targets: class index), regression (targets: standardised
    values; ``to_original`` maps predictions back) or survival (targets: [n, 2] time, event).
    """

    type: str
    out_dim: int
    target_mean: float = 0.0
    target_std: float = 1.0
    log1p: bool = False

    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """Class probabilities, target values on the original scale, or log-risk scores."""
        outputs = np.asarray(outputs, np.float64)
        if self.type == "classification":
            shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            return shifted / shifted.sum(axis=1, keepdims=True)
        if self.type == "regression":
            values = outputs[:, 0] * self.target_std + self.target_mean
            return np.expm1(values) if self.log1p else values
        return outputs[:, 0]

    def metrics(self, targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
        """Test metrics; regression and survival targets are on the original scale here."""
        if self.type == "classification":
            return metrics.classification_metrics(targets, predictions)
        if self.type == "regression":
            return metrics.regression_metrics(targets, predictions)
        return survival_metrics(targets[:, 0], targets[:, 1].astype(bool), predictions)

    def score(self, targets: np.ndarray, predictions: np.ndarray) -> float:
        """Validation score, higher is better: AUC, -MAE or C-index (NaN when undefined)."""
        if self.type == "classification":
            return metrics.auc(targets, predictions)
        if self.type == "regression":
            return -metrics.regression_metrics(targets, predictions)["mae"]
        return c_index(targets[:, 0], targets[:, 1].astype(bool), predictions)

    def fit_targets(self, targets: np.ndarray) -> np.ndarray:
        """Targets as the loss sees them (regression: log1p if asked, then standardised)."""
        if self.type != "regression":
            return targets
        values = np.log1p(targets) if self.log1p else targets
        return ((values - self.target_mean) / self.target_std).astype(np.float32)


def make_objective(task_type: str, train_targets: np.ndarray, n_classes: int = 0, log1p: bool = False) -> Objective:
    """The objective of a task; regression statistics come from the training targets."""
    if task_type == "classification":
        return Objective("classification", n_classes)
    if task_type == "regression":
        values = np.log1p(train_targets) if log1p else np.asarray(train_targets, np.float64)
        std = float(values.std()) if len(values) > 1 and values.std() > 0 else 1.0
        return Objective("regression", 1, float(values.mean()), std, log1p)
    return Objective("survival", 1)


def _loss(objective_type: str, outputs: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    if objective_type == "classification":
        per_row = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    if objective_type == "regression":
        return jnp.sum(weights * (outputs[:, 0] - targets) ** 2) / jnp.maximum(jnp.sum(weights), 1.0)
    return cox_loss(outputs[:, 0], targets[:, 0], targets[:, 1], weights)


# ----------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4  # L2 penalty on the head's weight matrices
    epochs: int = 300
    batch_size: int = 256
    patience: int = 30
    seed: int = 0


_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _epoch(graphdef, objective_type, state, opt_state, x, y, index, weight, lr, penalty):
    """One pass over the minibatches ``index`` [steps, B] (``weight`` 0 marks padding)."""

    def loss_fn(s, xb, yb, wb):
        outputs = nnx.merge(graphdef, s)(xb)
        return _loss(objective_type, outputs, yb, wb) + penalty * _kernel_penalty(s)

    def step(carry, batch):
        s, o = carry
        i, w = batch
        loss, grads = jax.value_and_grad(loss_fn)(s, x[i], y[i], w)
        updates, o = _ADAM.update(grads, o, s)
        s = jax.tree.map(lambda p, u: p - lr * u, s, updates)
        return (s, o), loss

    (state, opt_state), losses = jax.lax.scan(step, (state, opt_state), (index, weight))
    return state, opt_state, jnp.mean(losses)


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_loss(graphdef, objective_type, state, x, y, weight):
    return _loss(objective_type, nnx.merge(graphdef, state)(x), y, weight)


def _bucket(n: int) -> int:
    """Row counts are padded to a power of two, so label fractions and splits share compilations."""
    return max(8, 1 << math.ceil(math.log2(max(n, 1))))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)]) if rows > len(x) else x


def _outputs(graphdef, state, x: np.ndarray) -> np.ndarray:
    """Head outputs for ``x``, run on rows padded to a bucket."""
    return np.asarray(_apply(graphdef, state, jnp.asarray(_pad_rows(np.asarray(x, np.float32), _bucket(len(x))))))[: len(x)]


def _epoch_indices(n: int, batch: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """[steps, batch] row indices of one epoch (shuffled when ``rng`` is given) and weights."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    steps = -(-n // batch)
    index = np.zeros(steps * batch, np.int32)
    weight = np.zeros(steps * batch, np.float32)
    index[:n], weight[:n] = order, 1.0
    return index.reshape(steps, batch), weight.reshape(steps, batch)


def train_head(
    net: ProbeNet,
    objective: Objective,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: TrainSettings,
) -> tuple[ProbeNet, dict[str, Any]]:
    """Fit ``net`` on ``train`` = (inputs, targets), keeping the epoch with the best val score.

    Targets are on the original scale (``objective.fit_targets`` transforms them for the loss).
    The score is ``objective.score`` with the val loss breaking ties (and replacing a score
    that is undefined on val). Returns the best net and a summary of the run.
    """
    graphdef, state = nnx.split(net)
    x_train, y_train = np.asarray(train[0], np.float32), objective.fit_targets(train[1])
    n_val = len(val[0])
    y_val_fit = jnp.asarray(_pad_rows(objective.fit_targets(val[1]), _bucket(n_val)))
    x_val = jnp.asarray(_pad_rows(np.asarray(val[0], np.float32), _bucket(n_val)))
    w_val = jnp.asarray(_pad_rows(np.ones(n_val, np.float32), _bucket(n_val)))
    n = len(train[0])
    full_batch = objective.type == "survival" or n <= settings.batch_size
    batch = _bucket(n) if full_batch else settings.batch_size
    if full_batch:  # padding rows (weight 0) give the bucket's shape
        x_train, y_train = _pad_rows(x_train, batch), _pad_rows(y_train, batch)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    rng = None if full_batch else np.random.default_rng(settings.seed)
    opt_state = _ADAM.init(state)
    lr, penalty = jnp.float32(settings.learning_rate), jnp.float32(settings.weight_decay)

    stopping = EarlyStopping(settings.patience, state)
    epoch = 0
    for epoch in range(1, settings.epochs + 1):
        index, weight = _epoch_indices(n, batch, rng)
        state, opt_state, _ = _epoch(graphdef, objective.type, state, opt_state, x_train, y_train,
                                     index, weight, lr, penalty)
        val_loss = float(_eval_loss(graphdef, objective.type, state, x_val, y_val_fit, w_val))
        val_outputs = np.asarray(_apply(graphdef, state, x_val))[:n_val]
        score = objective.score(val[1], objective.predictions(val_outputs))
        candidate = (score if math.isfinite(score) else -math.inf, -val_loss if math.isfinite(val_loss) else -math.inf)
        if stopping.update(candidate, state, epoch):
            break
    best = stopping.best_score
    summary = {"best_epoch": stopping.best_step, "epochs_run": epoch, "val_score": best[0], "val_loss": -best[1]}
    return nnx.merge(graphdef, stopping.best_state), summary


def predict(net: ProbeNet, objective: Objective, x: np.ndarray) -> np.ndarray:
    """The objective's predictions of a trained net on inputs ``x``."""
    graphdef, state = nnx.split(net)
    return objective.predictions(_outputs(graphdef, state, x))


def standardize(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """z-score every feature with the training rows' mean and std (all but the last axis)."""
    axes = tuple(range(train_x.ndim - 1))
    mean = train_x.mean(axis=axes, keepdims=True)
    std = train_x.std(axis=axes, keepdims=True)
    std = np.where(std > 1e-8, std, 1.0)
    return [((x - mean) / std).astype(np.float32) for x in (train_x, *others)]


def knn_predict(objective: Objective, train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """kNN predictions (cosine distance, uniform votes) in the objective's prediction format."""
    k = min(k, len(train_x))
    if objective.type == "classification":
        model = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
        proba = np.zeros((len(x), objective.out_dim))
        proba[:, model.classes_] = model.predict_proba(x)
        return proba
    values = np.log1p(train_y) if objective.log1p else train_y
    out = KNeighborsRegressor(n_neighbors=k, metric="cosine").fit(train_x, values).predict(x)
    return np.expm1(out) if objective.log1p else out
