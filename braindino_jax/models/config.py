"""Backbone configuration and the named ViT sizes.

The field names follow Meta's DINOv3 ``DinoVisionTransformer`` arguments where they exist, so a
DINOv3 config or checkpoint maps onto this one without guessing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FFN_LAYERS = ("mlp", "swiglu")
_DROP_PATH_SCHEDULES = ("uniform", "linear")
_NORMALIZE_COORDS = ("separate", "min", "max")
_ATTENTION = ("dot_product", "matmul")
_ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


class ModelConfigError(ValueError):
    """A backbone or head config field has an invalid value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and execution options of the DINOv3-style ViT.

    Architecture fields change the parameters; execution fields (``dtype``, ``attention``,
    ``remat``, ``scan_blocks``) change only how the same parameters are evaluated, except that
    ``scan_blocks`` stacks the block parameters along a leading ``depth`` axis.
    """

    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" (fc1/GELU/fc2) or "swiglu" (w1, w2, w3 as in DINOv3)
    swiglu_align_to: int = 8
    ffn_hidden_dim: int | None = None  # overrides the hidden size derived from ffn_ratio
    ffn_bias: bool = True
    qkv_bias: bool = False  # BrainDINO: no qkv bias
    mask_k_bias: bool = True  # DINOv3 zeroes the key third of the qkv bias through a fixed mask
    proj_bias: bool = True
    n_storage_tokens: int = 4
    layerscale_init: float | None = 1e-5
    norm_eps: float = 1e-5  # DINOv3 "layernormbf16"; its plain "layernorm" uses 1e-6
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "uniform"  # DINOv3 uses one rate for every block
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize_coords: str = "separate"
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None
    dtype: str = "float32"  # compute dtype of the matmuls; parameters always float32
    attention: str = "dot_product"  # jax.nn.dot_product_attention, or "matmul" (vit.matmul_attention)
    attention_implementation: str | None = None  # passed to dot_product_attention ("xla", "cudnn")
    remat: bool = False
    scan_blocks: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return COMPUTE_DTYPES[self.dtype]

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.n_storage_tokens

    @property
    def hidden_dim(self) -> int:
        """FFN hidden width; SwiGLU takes 2/3 of it rounded up to ``swiglu_align_to`` (DINOv3)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn_layer == "swiglu":
            d = int(hidden * 2 / 3)
            return d + (-d % self.swiglu_align_to)
        return hidden

    def drop_path_rates(self) -> tuple[float, ...]:
        """Per-block stochastic-depth rates."""
        if self.drop_path_schedule == "uniform" or self.depth == 1:
            return (float(self.drop_path_rate),) * self.depth
        step = self.drop_path_rate / (self.depth - 1)
        return tuple(float(i * step) for i in range(self.depth))

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelConfigError(f"ViTConfig: unknown fields {unknown}")
        return cls(**data)

    def validate(self) -> None:
        def fail(name: str, reason: str) -> None:
            raise ModelConfigError(f"ViTConfig.{name}: {reason}")

        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "swiglu_align_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                fail(name, f"must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            fail("num_heads", f"embed_dim {self.embed_dim} is not divisible by {self.num_heads} heads")
        if self.head_dim % 4:
            fail("num_heads", f"head_dim {self.head_dim} must be divisible by 4 for 2D RoPE")
        if self.ffn_ratio <= 0:
            fail("ffn_ratio", f"must be > 0, got {self.ffn_ratio}")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            fail("ffn_hidden_dim", f"must be positive or None, got {self.ffn_hidden_dim}")
        if self.ffn_layer not in _FFN_LAYERS:
            fail("ffn_layer", f"must be one of {_FFN_LAYERS}, got {self.ffn_layer!r}")
        if self.n_storage_tokens < 0:
            fail("n_storage_tokens", f"must be >= 0, got {self.n_storage_tokens}")
        if self.layerscale_init is not None and self.layerscale_init <= 0:
            fail("layerscale_init", f"must be positive or None, got {self.layerscale_init}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail("drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if self.drop_path_schedule not in _DROP_PATH_SCHEDULES:
            fail("drop_path_schedule", f"must be one of {_DROP_PATH_SCHEDULES}")
        if self.rope_base is None and (self.rope_min_period is None or self.rope_max_period is None):
            fail("rope_base", "set rope_base, or both rope_min_period and rope_max_period")
        if self.rope_base is not None and self.rope_min_period is not None:
            fail("rope_min_period", "rope_base and rope_min/max_period are mutually exclusive")
        if self.rope_normalize_coords not in _NORMALIZE_COORDS:
            fail("rope_normalize_coords", f"must be one of {_NORMALIZE_COORDS}")
        if self.rope_shift_coords is not None and self.rope_shift_coords < 0:
            fail("rope_shift_coords", "must be >= 0 or None")
        for name in ("rope_jitter_coords", "rope_rescale_coords"):
            value = getattr(self, name)
            if value is not None and value < 1.0:
                fail(name, f"is a log-uniform factor and must be >= 1, got {value}")
        if self.dtype not in COMPUTE_DTYPES:
            fail("dtype", f"must be one of {tuple(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.attention not in _ATTENTION:
            fail("attention", f"must be one of {_ATTENTION}, got {self.attention!r}")
        if self.attention_implementation not in _ATTENTION_IMPLEMENTATIONS:
            fail("attention_implementation",
                 f"must be one of {_ATTENTION_IMPLEMENTATIONS}, got {self.attention_implementation!r}")
        if self.attention_implementation == "cudnn" and self.dtype == "float32":
            # cuDNN's fused attention takes only 16-bit inputs; float32 would fail inside XLA.
            fail("attention_implementation", "'cudnn' needs dtype 'bfloat16' or 'float16'")


# Named sizes. vit_giant is DINOv2/DINOv3's "giant2" (1536 wide, 64-dim heads) with its SwiGLU
# FFN: hidden int(4 * 1536 * 2/3) = 4096.
VIT_SIZES: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}


def vit_config(name: str, **overrides: Any) -> ViTConfig:
    """The named size with BrainDINO defaults, plus any field overrides."""
    if name not in VIT_SIZES:
        raise ModelConfigError(f"unknown ViT size {name!r}; choose one of {sorted(VIT_SIZES)}")
    return ViTConfig(**{**VIT_SIZES[name], **overrides})
