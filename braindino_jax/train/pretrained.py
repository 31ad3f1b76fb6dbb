"""Start a run from existing weights: DINOv3 natural-image weights, an export, or a stage-1 run.

``model.init_from`` (student and teacher) and ``gram.teacher`` (stage 2's Gram teacher) accept:
  * a folder written by ``braindino-convert to-flax`` or by a training run's backbone export
    (Orbax + ``config.json``; heads are taken too when the folder has them);
  * a ``.pth``/``.safetensors`` file in Meta's, timm's or a DINOv3 training checkpoint's layout;
  * a training work directory (its latest teacher: backbone and heads).

The weights must have the configured architecture; only execution settings (dtype, attention,
remat, scan, drop path) may differ, and they are taken from the config. An RGB patch embedding
is folded for ``in_chans=1`` (exact for grayscale repeated to RGB).
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from braindino_jax.models import convert
from braindino_jax.models.config import ViTConfig
from braindino_jax.models.heads import DINOHead
from braindino_jax.models.vit import VisionTransformer

# Fields that change how the same parameters are evaluated, not the parameters themselves.
EXECUTION_FIELDS = ("dtype", "attention", "attention_implementation", "remat", "scan_blocks",
                    "drop_path_rate", "drop_path_schedule", "rope_shift_coords",
                    "rope_jitter_coords", "rope_rescale_coords")


class InitError(ValueError):
    """Weights that cannot start this run; the message names the source and the field."""


def architecture_mismatch(stored: ViTConfig, wanted: ViTConfig) -> list[str]:
    """``field: stored != wanted`` for every architecture field that differs."""
    out = []
    for field in dataclasses.fields(ViTConfig):
        name = field.name
        if name in EXECUTION_FIELDS or name == "in_chans":
            continue
        a, b = getattr(stored, name), getattr(wanted, name)
        if a != b:
            out.append(f"{name}: {a!r} in the weights, {b!r} in the config")
    return out


def _is_workdir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))


def load_weights(source: str, vit: ViTConfig, field: str = "model.init_from",
                 ) -> tuple[VisionTransformer, dict[str, DINOHead]]:
    """Backbone (in ``vit``'s layout and execution settings) and any heads from ``source``."""
    if not os.path.exists(source):
        raise InitError(f"config.{field}: {source!r} does not exist")
    try:
        if _is_workdir(source):
            from braindino_jax.train.checkpoint import load_teacher  # a stage-1 run

            model, heads = load_teacher(source)
        elif os.path.isdir(source):
            model, heads = convert.load_flax_checkpoint(source)
        else:
            model, heads = convert.load_backbone(source, in_chans=vit.in_chans)
    except convert.CheckpointError as exc:
        raise InitError(f"config.{field}: {exc}") from exc
    mismatch = architecture_mismatch(model.config, vit)
    if mismatch:
        raise InitError(f"config.{field}: {source} has another architecture than config.model: "
                        + "; ".join(mismatch))
    state = convert.fold_input_channels(convert.backbone_to_meta(model), vit.in_chans)
    try:
        backbone = convert.meta_to_backbone(state, vit)
    except convert.CheckpointError as exc:
        raise InitError(f"config.{field}: {source}: {exc}") from exc
    return backbone, heads


def params_of(module: nnx.Module) -> nnx.State:
    return nnx.state(module, nnx.Param)
