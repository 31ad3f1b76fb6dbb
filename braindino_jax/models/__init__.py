"""ViT backbone, DINO/iBOT heads and weight conversion."""

from braindino_jax.models.config import VIT_SIZES, ModelConfigError, ViTConfig, vit_config
from braindino_jax.models.convert import (
    CheckpointError,
    export_backbone,
    load_backbone,
    load_flax_checkpoint,
    save_flax_checkpoint,
)
from braindino_jax.models.heads import DINOHead, HeadConfig
from braindino_jax.models.vit import VisionTransformer, abstract_vit, build_vit, count_params

__all__ = [
    "VIT_SIZES", "CheckpointError", "DINOHead", "HeadConfig", "ModelConfigError", "ViTConfig",
    "VisionTransformer", "abstract_vit", "build_vit", "count_params", "export_backbone",
    "load_backbone", "load_flax_checkpoint", "save_flax_checkpoint", "vit_config",
]
