"""DINOv3-style Vision Transformer backbone in Flax NNX.

Images are NHWC float arrays ``[B, H, W, in_chans]`` (H and W multiples of the patch size).
Parameters are float32; matmuls run in ``config.dtype``; LayerNorm, softmax, RoPE and the
residual stream stay float32.

Train/eval follows NNX: ``model.train()`` enables stochastic depth and the RoPE coordinate
augmentations (they then need ``key=``), ``model.eval()`` turns them off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from braindino_jax.models.config import ViTConfig, vit_config
from braindino_jax.models.rope import RopeEmbedding, apply_rope

_F32 = jnp.float32
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(din: int, dout: int, bias: bool, config: ViTConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=config.compute_dtype,
        param_dtype=_F32,
        kernel_init=_trunc_normal,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _layer_norm(config: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.embed_dim, epsilon=config.norm_eps, dtype=_F32, param_dtype=_F32, rngs=rngs
    )


class LayerScale(nnx.Module):
    """Per-channel residual scale (``ls1.gamma`` / ``ls2.gamma`` in DINOv3)."""

    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, _F32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(_F32) * self.gamma[...]


def k_bias_mask(dim: int) -> np.ndarray:
    """DINOv3's LinearKMaskedBias mask over the qkv bias: 1 on q and v, 0 on the key third."""
    return np.concatenate([np.ones(dim), np.zeros(dim), np.ones(dim)]).astype(np.float32)


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE on the patch tokens only."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.embed_dim
        self.qkv = _linear(d, 3 * d, config.qkv_bias, config, rngs)
        self.proj = _linear(d, d, config.proj_bias, config, rngs)

    def _project_qkv(self, x: jax.Array) -> jax.Array:
        c = self.config
        if not (c.qkv_bias and c.mask_k_bias):
            return self.qkv(x)
        kernel = self.qkv.kernel[...].astype(c.compute_dtype)
        bias = (self.qkv.bias[...] * k_bias_mask(c.embed_dim)).astype(c.compute_dtype)
        return jnp.dot(x.astype(c.compute_dtype), kernel) + bias

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        c = self.config
        b, n, _ = x.shape
        qkv = self._project_qkv(x).reshape(b, n, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
        prefix = n - sin.shape[0]
        q = jnp.concatenate([q[:, :prefix], apply_rope(q[:, prefix:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :prefix], apply_rope(k[:, prefix:], sin, cos)], axis=1)
        if c.attention == "dot_product":
            out = jax.nn.dot_product_attention(q, k, v, implementation=c.attention_implementation)
        else:
            out = matmul_attention(q, k, v)
        return self.proj(out.reshape(b, n, c.embed_dim))


def matmul_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention on [B, N, heads, D] as two batched matmuls, logits and softmax in
    float32. The heads are folded into a contiguous batch first: XLA's CPU matmul then runs
    1.8x (float32) to 3.8x (bfloat16) faster than ``dot_product_attention`` on ViT-B shapes
    (``benchmarks/probe_throughput.py --sections attention``)."""
    b, n, heads, d = q.shape

    def fold(x: jax.Array) -> jax.Array:
        return x.transpose(0, 2, 1, 3).reshape(b * heads, n, d)

    logits = jnp.matmul(fold(q), fold(k).transpose(0, 2, 1), preferred_element_type=_F32) * d**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.matmul(probs, fold(v), preferred_element_type=_F32).astype(v.dtype)
    return out.reshape(b, heads, n, d).transpose(0, 2, 1, 3)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(config.embed_dim, config.hidden_dim, config.ffn_bias, config, rngs)
        self.fc2 = _linear(config.hidden_dim, config.embed_dim, config.ffn_bias, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLUFFN(nnx.Module):
    """w3(silu(w1 x) * w2 x), DINOv3's SwiGLU FFN."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        d, h = config.embed_dim, config.hidden_dim
        self.w1 = _linear(d, h, config.ffn_bias, config, rngs)
        self.w2 = _linear(d, h, config.ffn_bias, config, rngs)
        self.w3 = _linear(h, d, config.ffn_bias, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    keep = 1.0 - jnp.asarray(rate, _F32)
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask.astype(x.dtype) / keep


class Block(nnx.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x))."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.norm2 = _layer_norm(config, rngs)
        self.mlp = SwiGLUFFN(config, rngs=rngs) if config.ffn_layer == "swiglu" else Mlp(config, rngs=rngs)
        init = config.layerscale_init
        self.ls1 = LayerScale(config.embed_dim, init) if init is not None else None
        self.ls2 = LayerScale(config.embed_dim, init) if init is not None else None

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        drop_rate: jax.Array | float = 0.0,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """``key`` given: stochastic depth at ``drop_rate``; None: deterministic."""
        keys = jax.random.split(key) if key is not None else (None, None)
        branches = (
            (lambda y: self.attn(self.norm1(y), sin, cos), self.ls1),
            (lambda y: self.mlp(self.norm2(y)), self.ls2),
        )
        for (branch, scale), k in zip(branches, keys):
            y = branch(x)
            y = scale(y) if scale is not None else y.astype(_F32)
            if k is not None:
                y = drop_path(y, drop_rate, k)
            x = x + y
        return x


class VisionTransformer(nnx.Module):
    """DINOv3 ViT: patch embedding, CLS + storage tokens, RoPE blocks, final LayerNorm.

    Token order is [CLS, storage_0..R-1, patches (row-major)], as in DINOv3.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        p, d = c.patch_size, c.embed_dim
        fan_in = c.in_chans * p * p
        # PyTorch Conv2d's default init, which DINOv3's PatchEmbed keeps: U(+-1/sqrt(fan_in)).
        bound = fan_in**-0.5
        self.patch_embed = nnx.Conv(
            c.in_chans,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=c.compute_dtype,
            param_dtype=_F32,
            kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=lambda key, shape, dtype=_F32: jax.random.uniform(key, shape, dtype, -bound, bound),
            rngs=rngs,
        )
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), _F32))
        self.storage_tokens = (
            nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, c.n_storage_tokens, d), _F32))
            if c.n_storage_tokens > 0
            else None
        )
        self.mask_token = nnx.Param(jnp.zeros((1, d), _F32))
        self.rope_embed = RopeEmbedding(c)
        if c.scan_blocks:
            self.blocks = _stacked_blocks(c, rngs)
        else:
            self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.depth)])
        self.norm = _layer_norm(c, rngs)
        self.deterministic = False

    def _check_inputs(self, images: jax.Array, masks: jax.Array | None) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_chans:
            raise ValueError(
                f"images must be NHWC [B, H, W, {c.in_chans}] (ViTConfig.in_chans), got shape {images.shape}"
            )
        _, h, w, _ = images.shape
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of ViTConfig.patch_size={c.patch_size}"
            )
        if masks is not None:
            expected = (images.shape[0], (h // c.patch_size) * (w // c.patch_size))
            if tuple(masks.shape) != expected or masks.dtype != jnp.bool_:
                raise ValueError(
                    f"masks must be bool {list(expected)} (batch, patches), got {masks.dtype} {list(masks.shape)}"
                )

    def _needs_key(self) -> bool:
        return not self.deterministic and (self.config.drop_path_rate > 0 or self.rope_embed.augments)

    def prepare_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> tuple[jax.Array, tuple[int, int]]:
        """Patch-embed, put the mask token at masked patches, prepend CLS and storage tokens."""
        self._check_inputs(images, masks)
        x = self.patch_embed(images.astype(self.config.compute_dtype)).astype(_F32)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if masks is not None:
            x = jnp.where(masks[..., None], self.mask_token[...][None], x)
        prefix = [self.cls_token[...]]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens[...])
        prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1), (b, self.config.num_prefix_tokens, d))
        return jnp.concatenate([prefix, x], axis=1), (h, w)

    def _run_blocks(
        self, x: jax.Array, sin: jax.Array, cos: jax.Array, key: jax.Array | None, collect: Sequence[int]
    ) -> tuple[jax.Array, list[jax.Array]]:
        c = self.config
        rates = jnp.asarray(c.drop_path_rates(), _F32)
        stochastic = key is not None and c.drop_path_rate > 0
        block_keys = jax.random.split(key, c.depth) if stochastic else None
        fn = nnx.remat(Block.__call__) if c.remat else Block.__call__
        if not c.scan_blocks:
            outputs = []
            for i, block in enumerate(self.blocks):
                x = fn(block, x, sin, cos, rates[i], block_keys[i] if stochastic else None)
                if i in collect:
                    outputs.append(x)
            return x, outputs

        keep_all = bool(collect)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0, 0), out_axes=(nnx.Carry, 0))
        def body(carry, block, sin_, cos_, rate, k):
            y = fn(block, carry, sin_, cos_, rate, k if stochastic else None)
            return y, (y if keep_all else None)

        scan_keys = block_keys if stochastic else jnp.zeros((c.depth, 2), jnp.uint32)
        x, stacked = body(x, self.blocks, sin, cos, rates, scan_keys)
        return x, [stacked[i] for i in collect] if keep_all else []

    def __call__(
        self,
        images: jax.Array,
        masks: jax.Array | None = None,
        *,
        key: jax.Array | None = None,
        layers: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Forward pass.

        Returns a dict (DINOv3's ``forward_features`` keys): ``x_norm_clstoken`` [B, D],
        ``x_storage_tokens`` [B, R, D], ``x_norm_patchtokens`` [B, h*w, D], ``x_prenorm``
        [B, 1+R+h*w, D], ``masks``, and with ``layers`` (block indices, negative counts from the
        end) ``intermediate_layers``: per layer a dict of the final-norm-applied cls, storage and
        patch tokens. Outputs are float32.
        """
        c = self.config
        indices = _resolve_layers(layers, c.depth)
        x, (h, w) = self.prepare_tokens(images, masks)
        if self._needs_key():
            if key is None:
                raise ValueError(
                    "training mode with drop_path_rate > 0 or RoPE coordinate augmentation needs key= "
                    "(or call model.eval())"
                )
            rope_key, block_key = jax.random.split(key)
        else:
            rope_key = block_key = None
        sin, cos = self.rope_embed(h, w, rope_key)
        x, collected = self._run_blocks(x, sin, cos, block_key, indices)
        out = self._split(self.norm(x))
        out["x_prenorm"] = x
        out["masks"] = masks
        if indices:
            out["intermediate_layers"] = tuple(self._split(self.norm(y)) for y in collected)
        return out

    def _split(self, tokens: jax.Array) -> dict[str, jax.Array]:
        r = self.config.num_prefix_tokens
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_storage_tokens": tokens[:, 1:r],
            "x_norm_patchtokens": tokens[:, r:],
        }

    def get_intermediate_layers(
        self,
        images: jax.Array,
        n: int | Sequence[int] = 1,
        *,
        reshape: bool = False,
        norm: bool = True,
    ) -> tuple[dict[str, jax.Array], ...]:
        """Tokens after chosen blocks (``n``: the last n blocks, or a list of indices).

        Each entry has ``x_norm_clstoken``, ``x_storage_tokens`` and ``x_norm_patchtokens``
        (``[B, h, w, D]`` with ``reshape``), normalised by the final norm unless ``norm=False``.
        """
        c = self.config
        indices = tuple(range(c.depth - n, c.depth)) if isinstance(n, int) else tuple(n)
        indices = _resolve_layers(indices, c.depth)
        x, (h, w) = self.prepare_tokens(images)
        sin, cos = self.rope_embed(h, w)
        _, collected = self._run_blocks(x, sin, cos, None, indices)
        outputs = []
        for y in collected:
            parts = self._split(self.norm(y) if norm else y)
            if reshape:
                p = parts["x_norm_patchtokens"]
                parts["x_norm_patchtokens"] = p.reshape(p.shape[0], h, w, p.shape[-1])
            outputs.append(parts)
        return tuple(outputs)


def _resolve_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    resolved = []
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer index {i} out of range for depth {depth}")
        resolved.append(j)
    return tuple(resolved)


def _stacked_blocks(config: ViTConfig, rngs: nnx.Rngs) -> Block:
    """``depth`` blocks as one Block whose parameters carry a leading depth axis (for nnx.scan)."""

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> Block:
        return Block(config, rngs=r)

    return make(rngs)


def build_vit(name_or_config: str | ViTConfig, *, seed: int = 0, **overrides: Any) -> VisionTransformer:
    """A randomly initialised backbone from a size name (``vit_base``) or a config."""
    if isinstance(name_or_config, str):
        config = vit_config(name_or_config, **overrides)
    else:
        config = name_or_config.replace(**overrides) if overrides else name_or_config
    return VisionTransformer(config, rngs=nnx.Rngs(seed))


def abstract_vit(config: ViTConfig) -> VisionTransformer:
    """The backbone with ShapeDtypeStruct leaves: shapes and parameter counts without allocation."""
    return nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of trainable (nnx.Param) scalars; buffers such as RoPE periods are not counted."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
