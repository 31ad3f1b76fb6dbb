"""Analytical FLOP count of the backbone, for throughput and MFU figures."""

from __future__ import annotations

from braindino_jax.models.config import ViTConfig


def vit_forward_flops(config: ViTConfig, height: int, width: int) -> int:
    """Forward FLOPs for one image (a multiply-add counts 2; norms, softmax, RoPE ignored).

    With N = (H/p)(W/p) patches, T = N + 1 + R tokens, D = embed_dim, F = FFN hidden width:
      patch embedding:   2 N (C p^2) D
      per block:         qkv 2 T D (3D) + logits 2 T^2 D + attn x V 2 T^2 D + proj 2 T D^2
                         + FFN 2 T D F x (2 for MLP, 3 for SwiGLU)
      total:             patch embedding + depth x block
    Forward + backward is taken as 3 x forward (the backward computes two matmuls per forward one).
    """
    p, d, c = config.patch_size, config.embed_dim, config.in_chans
    n = (height // p) * (width // p)
    t = n + config.num_prefix_tokens
    ffn_mats = 3 if config.ffn_layer == "swiglu" else 2
    patch = 2 * n * c * p * p * d
    block = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 2 * t * d * config.hidden_dim * ffn_mats
    return patch + config.depth * block


def vit_train_flops(config: ViTConfig, height: int, width: int) -> int:
    """Forward + backward FLOPs for one image (3 x forward)."""
    return 3 * vit_forward_flops(config, height, width)
