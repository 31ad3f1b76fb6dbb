"""From per-slice features to one feature per volume, and from modalities to one per row.

Fixed pooling (mean, BrainDINO's default, or max) happens once on the host. Attention pooling
is learned: ``AttentionPool`` (gated attention, Ilse et al. 2018) weighs a volume's slices and
is trained together with the head, so those rows keep their slices ``[M, N, D]``.
Modalities (one image column each) are averaged or concatenated after pooling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def slice_tokens(features: dict[str, np.ndarray], token: str) -> np.ndarray:
    """Per-slice features [N, D] (float32): the CLS token, the mean patch token, or both."""
    if token == "cls+patch_mean":
        return np.concatenate([features["cls"], features["patch_mean"]], axis=-1).astype(np.float32)
    return np.asarray(features[token], np.float32)


def pool_slices(tokens: np.ndarray, pooling: str) -> np.ndarray:
    """[..., N, D] → [..., D] by ``mean`` or ``max`` over slices."""
    if pooling == "mean":
        return tokens.mean(axis=-2)
    if pooling == "max":
        return tokens.max(axis=-2)
    raise ValueError(f"pooling: expected 'mean' or 'max', got {pooling!r}")


def fuse_modalities(x, fusion: str):
    """[..., M, D] → [..., D] (average) or [..., M * D] (concat); numpy or jax arrays."""
    if fusion == "average":
        return x.mean(axis=-2)
    if fusion == "concat":
        return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
    raise ValueError(f"fusion: expected 'average' or 'concat', got {fusion!r}")


def row_inputs(per_modality: list[dict[str, np.ndarray]], token: str, pooling: str, fusion: str) -> np.ndarray:
    """A row's head input: [F] for mean/max pooling, [M, N, D] slices for attention pooling."""
    tokens = np.stack([slice_tokens(f, token) for f in per_modality])  # [M, N, D]
    if pooling == "attention":
        return tokens
    return fuse_modalities(pool_slices(tokens, pooling), fusion)


class AttentionPool(nnx.Module):
    """Gated attention pooling over slices: softmax_n(w · (tanh(V h_n) ⊙ sigmoid(U h_n)))."""

    def __init__(self, dim: int, hidden: int = 128, *, rngs: nnx.Rngs):
        self.v = nnx.Linear(dim, hidden, rngs=rngs)
        self.u = nnx.Linear(dim, hidden, rngs=rngs)
        self.w = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., N, D] → [..., D]; the weights are a float32 softmax over the N slices."""
        logits = self.w(jnp.tanh(self.v(x)) * jax.nn.sigmoid(self.u(x)))[..., 0]
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("...n,...nd->...d", weights, x)
