"""Segmentation probe: frozen patch features of several blocks → a light decoder → class maps.

The encoder's patch maps (final-normed, of e.g. blocks 2, 5, 8, 11) are concatenated per patch.
Two decoders:
- ``linear``: LN -> Linear per patch to K logits, bilinearly upsampled to slice resolution
  (the DINOv2 linear segmentation probe);
- ``transposed_conv``: LN -> Linear(C) -> GELU, then 2x2 stride-2 transposed convolutions (with
  GELU, halving the width each time) up to the patch size, a 1x1 convolution to K, and a
  resize for any remaining factor.

Training samples slices of the training volumes (cross-entropy plus soft Dice, in float32);
evaluation stacks a volume's slice predictions (each distinct slice once: sampling N slices
repeats some in a volume with fewer) and scores the 3D stack: Dice per foreground
class (scikit-learn's F1 over voxels, NaN when a class is absent from both) and their mean.
Only the decoder has parameters here: the encoder ran before, and the features are arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.metrics import f1_score

from braindino_jax.probes.early_stopping import EarlyStopping


class UpsampleBlock(nnx.Module):
    """A 2x2, stride-2 transposed convolution. Its kernel windows do not overlap, so it equals a
    per-pixel Linear(C_in, 4 C_out) whose outputs fill a 2x2 block: a matmul and a reshape,
    which XLA runs several times faster on CPU than a transposed convolution's gradient."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.out_channels = out_channels
        self.linear = nnx.Linear(in_channels, 4 * out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        y = self.linear(x).reshape(b, h, w, 2, 2, self.out_channels)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.out_channels)


class SegmentationDecoder(nnx.Module):
    def __init__(self, kind: str, in_dim: int, n_classes: int, grid: int, out_size: int,
                 channels: int = 64, *, rngs: nnx.Rngs):
        self.kind, self.out_size = kind, out_size
        self.norm = nnx.LayerNorm(in_dim, rngs=rngs)
        if kind == "linear":
            self.proj = nnx.Linear(in_dim, n_classes, rngs=rngs)
            self.ups = nnx.List([])
            self.out = None
        else:
            self.proj = nnx.Linear(in_dim, channels, rngs=rngs)
            n_up = max(0, int(math.floor(math.log2(out_size / grid))))
            # Width halves with each doubling of resolution (not below 8), as in a U-Net decoder.
            widths = [max(channels >> i, min(channels, 8)) for i in range(n_up + 1)]
            self.ups = nnx.List([UpsampleBlock(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])
            self.out = nnx.Linear(widths[-1], n_classes, rngs=rngs)  # the 1x1 convolution

    def __call__(self, x: jax.Array) -> jax.Array:
        """Patch features [B, h, w, F] → float32 logits [B, out_size, out_size, K]."""
        x = self.proj(self.norm(x.astype(jnp.float32)))
        if self.out is not None:
            x = jax.nn.gelu(x, approximate=False)
            for up in self.ups:
                x = jax.nn.gelu(up(x), approximate=False)
            x = self.out(x)
        b, h, w, k = x.shape
        if h != self.out_size or w != self.out_size:
            x = jax.image.resize(x, (b, self.out_size, self.out_size, k), method="bilinear")
        return x.astype(jnp.float32)


def segmentation_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean per-pixel cross-entropy plus (1 - soft Dice averaged over classes), float32."""
    logits = logits.astype(jnp.float32)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    axes = (0, 1, 2)
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2 * intersection + 1.0) / (denominator + 1.0)
    return ce + 1.0 - jnp.mean(dice)


@dataclasses.dataclass(frozen=True)
class SegmentationSettings:
    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    eval_every: int = 100
    patience: int = 5
    channels: int = 64
    seed: int = 0


@dataclasses.dataclass
class SegmentationVolume:
    """One volume's decoder inputs and targets."""

    features: np.ndarray  # [N, h, w, F] (float16: blocks concatenated)
    classes: np.ndarray  # [N, S, S] int32 class indices


def class_indices(labels: np.ndarray, label_values: tuple[int, ...], where: str) -> np.ndarray:
    """Label-map values → class indices (the position in ``label_values``); an unlisted value
    is a ValueError naming ``where``."""
    lookup = {v: i for i, v in enumerate(label_values)}
    present = np.unique(labels)
    unknown = [int(v) for v in present if int(v) not in lookup]
    if unknown:
        raise ValueError(f"{where}: label values {unknown} are not in config.task.label_values {label_values}")
    table = np.zeros(int(present.max()) + 1, np.int32)
    for v in present:
        table[int(v)] = lookup[int(v)]
    return table[labels]


def distinct_slices(slice_indices: np.ndarray) -> np.ndarray:
    """Positions of each distinct slice once, in order. Sampling N slices from a volume with
    fewer repeats some; the decoder trains and Dice is scored on the volume's own slices."""
    return np.unique(slice_indices, return_index=True)[1]


def stack_blocks(arrays: dict[str, np.ndarray], layers: tuple[int, ...]) -> np.ndarray:
    """Concatenate the cached patch maps of ``layers`` along features: [N, h, w, L * D]."""
    return np.concatenate([arrays[f"patch_{block}"] for block in layers], axis=-1)


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """One object per setting, so the jitted step (which takes it statically) compiles once."""
    return optax.adamw(learning_rate, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, tx, state, opt_state, features, labels):
    def loss_fn(s):
        return segmentation_loss(nnx.merge(graphdef, s)(features), labels)

    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(0,))
def _predict(graphdef, state, features):
    return jnp.argmax(nnx.merge(graphdef, state)(features), axis=-1).astype(jnp.int32)


def predict_volume(decoder: SegmentationDecoder, features: np.ndarray, batch: int = 16) -> np.ndarray:
    """Class map [N, S, S] of one volume, predicted in slice batches (padded to ``batch``)."""
    graphdef, state = nnx.split(decoder)
    out = []
    for start in range(0, len(features), batch):
        chunk = features[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(_predict(graphdef, state, jnp.asarray(chunk)))[: batch - pad])
    return np.concatenate(out)


def dice_scores(truth: np.ndarray, prediction: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of each foreground class 1..K-1 over a whole (3D) volume; NaN where the class is
    absent from both truth and prediction."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f1_score(truth.ravel(), prediction.ravel(), labels=np.arange(1, n_classes), average=None,
                        zero_division=np.nan)


def mean_dice(decoder: SegmentationDecoder, volumes: list[SegmentationVolume], n_classes: int) -> float:
    per_volume = [np.nanmean(dice_scores(v.classes, predict_volume(decoder, v.features), n_classes))
                  for v in volumes]
    return float(np.nanmean(per_volume)) if per_volume else float("nan")


def train_decoder(
    kind: str,
    train: list[SegmentationVolume],
    val: list[SegmentationVolume],
    n_classes: int,
    settings: SegmentationSettings,
) -> tuple[SegmentationDecoder, dict[str, Any]]:
    """Train a decoder on random slice batches of ``train``, keeping the best val mean Dice."""
    features = np.concatenate([v.features for v in train])
    classes = np.concatenate([v.classes for v in train])
    grid, size = features.shape[1], classes.shape[-1]
    decoder = SegmentationDecoder(kind, features.shape[-1], n_classes, grid, size, settings.channels,
                                  rngs=nnx.Rngs(settings.seed))
    graphdef, state = nnx.split(decoder)
    tx = _optimizer(settings.learning_rate, settings.weight_decay)
    opt_state = tx.init(state)
    rng = np.random.default_rng(settings.seed)
    stopping, losses, window = EarlyStopping(settings.patience, state), [], []
    step = 0
    for step in range(1, settings.steps + 1):
        take = rng.integers(0, len(features), settings.batch_size)
        state, opt_state, loss = _step(graphdef, tx, state, opt_state, jnp.asarray(features[take]),
                                       jnp.asarray(classes[take]))
        window.append(loss)  # device scalars: read once per evaluation, not per step
        if step % settings.eval_every == 0 or step == settings.steps:
            losses.append(float(jnp.mean(jnp.stack(window))))
            window = []
            score = mean_dice(nnx.merge(graphdef, state), val, n_classes)
            if stopping.update(score if math.isfinite(score) else -math.inf, state, step):
                break
    # train_loss: the mean minibatch loss of each evaluation interval.
    summary = {"best_step": stopping.best_step, "steps_run": step, "val_dice_mean": stopping.best_score,
               "train_loss": losses}
    return nnx.merge(graphdef, stopping.best_state), summary
