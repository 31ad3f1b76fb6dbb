"""Per-parameter optimizer groups, by name, as DINOv3's ``param_groups.py`` assigns them.

* Layer-wise lr decay: block ``i`` of a ``depth``-block backbone gets ``decay ** (depth - i)``;
  the patch embedding and the learned tokens sit below block 0 (``decay ** (depth + 1)``); the
  final norm and both heads get 1. The patch embedding is further scaled by ``patch_embed_mult``.
* No weight decay on biases, norm parameters, LayerScale gammas, or the CLS, storage and mask
  tokens (DESIGN.md: our choice; DINOv3's comment says the same but its code decays the tokens).
* The heads' ``last_layer`` (the prototypes) is flagged, so the optimizer can hold it still
  during the first epoch.

Checked against DINOv3's own ``SSLMetaArch.get_params_groups`` (default config) for every
parameter of a ViT-B student and its heads (tests/train/test_param_groups_parity.py): equal but
for the tokens' weight decay above. DINOv3 calls its grouping on each submodule separately, so
parameter names never carry the ``dino_head`` prefix and its ``dino_head_wd_multiplier`` has no
effect (its default is 1 anyway); we have no such option.

Parameters are addressed by their path in the student's parameter tree,
``{backbone, dino_head, ibot_head}``. With ``scan_blocks`` the block parameters are stacked along a
leading depth axis, so their lr multiplier is an array ``[depth, 1, ...]`` that broadcasts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_TOKENS = ("cls_token", "storage_tokens", "mask_token")


def path_names(path: tuple) -> tuple[str, ...]:
    """String form of a pytree key path (dict keys, attribute names, sequence indices)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    if names and names[-1] == "value":  # nnx.Variable leaves end in `.value`
        names.pop()
    return tuple(names)


def weight_decay_multiplier(names: tuple[str, ...]) -> float:
    """0 for biases, norms, LayerScale gammas and learned tokens; 1 otherwise."""
    leaf = names[-1]
    if leaf in ("bias", "gamma") or leaf in _TOKENS or any("norm" in n for n in names):
        return 0.0
    return 1.0


def lr_multiplier(names: tuple[str, ...], shape: tuple[int, ...], depth: int, decay: float,
                  patch_embed_mult: float, scan_blocks: bool) -> Any:
    """Layer-wise decay times the patch-embedding factor (a float, or an array under scan)."""
    if names[0] != "backbone":
        return 1.0
    if "patch_embed" in names:
        return decay ** (depth + 1) * patch_embed_mult
    if names[1] in _TOKENS:
        return decay ** (depth + 1)
    if names[1] == "blocks":
        if scan_blocks:
            per_block = decay ** (depth - np.arange(depth, dtype=np.float64))
            return per_block.astype(np.float32).reshape((depth,) + (1,) * (len(shape) - 1))
        return decay ** (depth - int(names[2]))
    return 1.0


def is_last_layer(names: tuple[str, ...]) -> bool:
    return names[0] in ("dino_head", "ibot_head") and names[-1] == "last_layer"


def param_groups(params: Any, depth: int, layerwise_decay: float, patch_embed_mult: float,
                 scan_blocks: bool) -> dict[str, Any]:
    """Trees shaped like ``params``: ``lr`` and ``wd`` multipliers and the ``last_layer`` flags."""

    def each(fn):
        return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_names(p), x), params)

    return {
        "lr": each(lambda n, x: lr_multiplier(n, x.shape, depth, layerwise_decay, patch_embed_mult,
                                              scan_blocks)),
        "wd": each(lambda n, x: weight_decay_multiplier(n)),
        "last_layer": each(lambda n, x: is_last_layer(n)),
    }
