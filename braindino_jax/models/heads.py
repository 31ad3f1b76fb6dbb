"""DINO / iBOT projection head (one class; the two heads are separate instances).

MLP (``nlayers`` Linear layers, exact GELU between them) -> bottleneck -> L2 normalisation ->
bias-free linear layer to K prototypes. With ``weight_norm`` the prototype matrix is used with
unit-norm columns (DINOv2's ``weight_norm`` with g fixed to 1); without it (DINOv3) it is used as is.
The output logits are float32 for the losses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from braindino_jax.models.config import COMPUTE_DTYPES, ModelConfigError
from braindino_jax.ssl.normalize import l2_normalize

_F32 = jnp.float32
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    in_dim: int = 768
    out_dim: int = 65536
    nlayers: int = 3
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    mlp_bias: bool = True
    weight_norm: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("in_dim", "out_dim", "nlayers", "hidden_dim", "bottleneck_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"HeadConfig.{name}: must be a positive int, got {value!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ModelConfigError(f"HeadConfig.dtype: must be one of {tuple(COMPUTE_DTYPES)}, got {self.dtype!r}")

    def replace(self, **changes: Any) -> HeadConfig:
        return dataclasses.replace(self, **changes)

    @property
    def layer_dims(self) -> list[int]:
        """Widths of the MLP: in_dim, hidden (nlayers - 1 times), bottleneck."""
        return [self.in_dim] + [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]


class DINOHead(nnx.Module):
    """Projection head; ``last_layer`` is the [bottleneck, K] prototype matrix (no bias).

    Train steps that freeze the last layer early in training select it by the path ``last_layer``.
    """

    def __init__(self, config: HeadConfig, *, rngs: nnx.Rngs):
        self.config = config
        dims = config.layer_dims
        cdt = COMPUTE_DTYPES[config.dtype]
        self.mlp = nnx.List(
            [
                nnx.Linear(
                    dims[i],
                    dims[i + 1],
                    use_bias=config.mlp_bias,
                    dtype=cdt,
                    param_dtype=_F32,
                    kernel_init=_trunc_normal,
                    bias_init=nnx.initializers.zeros_init(),
                    rngs=rngs,
                )
                for i in range(config.nlayers)
            ]
        )
        self.last_layer = nnx.Param(_trunc_normal(rngs.params(), (config.bottleneck_dim, config.out_dim), _F32))

    def prototypes(self) -> jax.Array:
        """The effective [bottleneck, K] prototype matrix (column-normalised with weight norm)."""
        w = self.last_layer[...]
        if self.config.weight_norm:
            w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
        return w

    def __call__(
        self, x: jax.Array, *, no_last_layer: bool = False, only_last_layer: bool = False
    ) -> jax.Array:
        """[..., in_dim] -> [..., out_dim] float32 logits (or the normalised bottleneck)."""
        c = self.config
        if not only_last_layer:
            if x.shape[-1] != c.in_dim:
                raise ValueError(f"DINOHead expects [..., {c.in_dim}] (HeadConfig.in_dim), got {x.shape}")
            for i, layer in enumerate(self.mlp):
                x = layer(x)
                if i < c.nlayers - 1:
                    x = jax.nn.gelu(x, approximate=False)
            x = l2_normalize(x.astype(_F32))
        if no_last_layer:
            return x
        cdt = COMPUTE_DTYPES[c.dtype]
        return jnp.dot(x.astype(cdt), self.prototypes().astype(cdt), preferred_element_type=_F32)
