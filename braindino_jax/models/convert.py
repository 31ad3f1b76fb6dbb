"""Weight conversion between PyTorch DINOv3 checkpoints and the Flax backbone/heads.

Formats read:
- Meta's DINOv3 backbone state dict (``storage_tokens``, ``rope_embed.periods``,
  ``blocks.N.ls1.gamma``, ``blocks.N.attn.qkv.{weight,bias,bias_mask}``, ``blocks.N.mlp.fc1`` or
  ``w1/w2/w3``, ``norm.*``, ``mask_token``). The file's ``bias_mask`` is applied to the bias as
  given (Meta's released ViT-S/B/L store it as all zeros); a key bias it keeps is kept (the model
  then runs with ``mask_k_bias=False``): under RoPE a key bias changes the attention.
- timm's DINOv3 ``Eva`` state dict. Key mapping to Meta: ``reg_token`` -> ``storage_tokens``,
  ``gamma_1/gamma_2`` -> ``ls1.gamma/ls2.gamma``, ``attn.q_bias`` + zero k + ``attn.v_bias`` ->
  ``attn.qkv.bias`` (with the k-masking ``bias_mask``), ``mlp.fc1_g/fc1_x/fc2`` ->
  ``mlp.w1/w2/w3``. timm has no ``mask_token`` (zeros, DINOv3's init) and no periods buffer
  (recomputed from the config).
- DINOv3 training checkpoints: ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``.

Files: ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)`` (torch is optional,
imported only here), ``.safetensors`` through the safetensors numpy API, or its JAX reader for
bfloat16 (no torch).

Export writes Meta's key format to safetensors, with the ViTConfig as JSON metadata so a round
trip restores execution settings too.

LayerNorm epsilon is not in a state dict, and a wrong one changes every feature (by ~5e-3 for
1e-5 vs 1e-6): ``norm_eps_choice`` takes it from the file's stored config when it has one, else
1e-6 for DINOv3 training checkpoints (their ``layernorm``), else 1e-5 (the released backbones'
``layernormbf16``); an explicit ``norm_eps`` overrides all three.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from braindino_jax.models.config import ViTConfig
from braindino_jax.models.heads import DINOHead, HeadConfig
from braindino_jax.models.rope import rope_periods
from braindino_jax.models.vit import VisionTransformer, abstract_vit, k_bias_mask

StateDict = dict[str, np.ndarray]
CONFIG_METADATA_KEY = "braindino_vit_config"
HEAD_PREFIXES = ("dino_head", "ibot_head")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model; the message says which keys."""


# ----------------------------------------------------------------------------------------------
# Reading and writing files


def read_state_dict(path: str | os.PathLike, section: str = "teacher") -> StateDict:
    """Flat {key: float32/int numpy array} from a .pth/.pt or .safetensors file.

    A .pth holding nested dicts (a training checkpoint) is reduced to ``section``.
    """
    return _read_file(path, section)[0]


def _read_file(path: str | os.PathLike, section: str = "teacher") -> tuple[StateDict, bool]:
    """read_state_dict, and whether the file nested its weights in a training-checkpoint dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path), False
    if path.endswith((".pth", ".pt", ".bin")):
        return _read_torch(path, section)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .pth, .pt, .bin or .safetensors)")


def _read_safetensors(path: str) -> StateDict:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        try:
            raw = load_file(path)
        except TypeError:  # numpy has no bfloat16: read through JAX, kept on the host
            with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
                raw = f.get_tensors()
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    return {k: _to_numpy(v) for k, v in raw.items()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def _read_torch(path: str, section: str) -> tuple[StateDict, bool]:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(f"{path}: reading .pth needs PyTorch (pip install torch)") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    nested = not all(isinstance(v, torch.Tensor) for v in obj.values())
    if nested:
        if section not in obj or not isinstance(obj[section], Mapping):
            raise CheckpointError(
                f"{path}: nested checkpoint without a {section!r} state dict; top-level keys: {sorted(obj)}"
            )
        obj = obj[section]
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out, nested


def _to_numpy(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        return arr.astype(np.float32)
    return arr


def save_safetensors(state: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.fspath(path), metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Format detection and timm -> Meta


def split_training_checkpoint(state: StateDict) -> tuple[StateDict, dict[str, StateDict]]:
    """Split ``backbone.*`` / ``dino_head.*`` / ``ibot_head.*`` keys; a bare backbone passes through."""
    if not any(k.startswith("backbone.") for k in state):
        return dict(state), {}
    backbone, heads, unknown = {}, {}, []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix == "backbone":
            backbone[rest] = value
        elif prefix in HEAD_PREFIXES:
            heads.setdefault(prefix, {})[rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"training checkpoint has keys outside backbone/heads: {_listing(unknown)}")
    return backbone, heads


def detect_format(state: Mapping[str, Any]) -> str:
    """'meta' or 'timm' for a backbone state dict."""
    if "reg_token" in state or any(k.endswith((".gamma_1", ".attn.q_bias")) for k in state):
        return "timm"
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        return "meta"
    raise CheckpointError(
        "not a DINOv3 backbone state dict (no cls_token/patch_embed.proj.weight); first keys: "
        f"{_listing(list(state)[:10])}"
    )


_TIMM_RENAMES = (
    (re.compile(r"^reg_token$"), "storage_tokens"),
    (re.compile(r"\.gamma_1$"), ".ls1.gamma"),
    (re.compile(r"\.gamma_2$"), ".ls2.gamma"),
    (re.compile(r"\.mlp\.fc1_g\."), ".mlp.w1."),
    (re.compile(r"\.mlp\.fc1_x\."), ".mlp.w2."),
)


def timm_to_meta(state: Mapping[str, np.ndarray]) -> StateDict:
    """Rename a timm DINOv3 state dict to Meta's keys (the mapping in the module docstring)."""
    swiglu = any(".mlp.fc1_g." in k for k in state)
    out: StateDict = {}
    for key, value in state.items():
        if key == "rope.periods" or key.endswith(".attn.k_bias"):
            continue  # non-persistent buffers: periods recomputed, k bias is zero by construction
        if key.endswith((".attn.q_bias", ".attn.v_bias")):
            continue  # merged below
        new = key
        for pattern, repl in _TIMM_RENAMES:
            new = pattern.sub(repl, new)
        if swiglu:
            new = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", new)
        out[new] = np.asarray(value)
    for key in state:
        if key.endswith(".attn.q_bias"):
            base = key[: -len("q_bias")]
            q, v = np.asarray(state[key]), np.asarray(state[base + "v_bias"])
            out[base + "qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
            out[base + "qkv.bias_mask"] = k_bias_mask(q.shape[0])
    return out


# ----------------------------------------------------------------------------------------------
# Meta keys <-> Flax state paths


def _block_table(c: ViTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(Meta key suffix, Flax path inside a block, layout) for one block."""
    rows = [("norm1.weight", ("norm1", "scale"), "same"), ("norm1.bias", ("norm1", "bias"), "same"),
            ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear")]
    if c.qkv_bias:
        rows.append(("attn.qkv.bias", ("attn", "qkv", "bias"), "same"))
    rows.append(("attn.proj.weight", ("attn", "proj", "kernel"), "linear"))
    if c.proj_bias:
        rows.append(("attn.proj.bias", ("attn", "proj", "bias"), "same"))
    if c.layerscale_init is not None:
        rows += [("ls1.gamma", ("ls1", "gamma"), "same"), ("ls2.gamma", ("ls2", "gamma"), "same")]
    rows += [("norm2.weight", ("norm2", "scale"), "same"), ("norm2.bias", ("norm2", "bias"), "same")]
    for name in ("w1", "w2", "w3") if c.ffn_layer == "swiglu" else ("fc1", "fc2"):
        rows.append((f"mlp.{name}.weight", ("mlp", name, "kernel"), "linear"))
        if c.ffn_bias:
            rows.append((f"mlp.{name}.bias", ("mlp", name, "bias"), "same"))
    return rows


def _top_table(c: ViTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    rows = [("cls_token", ("cls_token",), "same")]
    if c.n_storage_tokens > 0:
        rows.append(("storage_tokens", ("storage_tokens",), "same"))
    rows += [
        ("mask_token", ("mask_token",), "same"),
        ("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv"),
        ("patch_embed.proj.bias", ("patch_embed", "bias"), "same"),
        ("rope_embed.periods", ("rope_embed", "periods"), "same"),
        ("norm.weight", ("norm", "scale"), "same"),
        ("norm.bias", ("norm", "bias"), "same"),
    ]
    return rows


# Axes that take a PyTorch tensor to the Flax layout; other layouts ("same") are not permuted.
_FLAX_AXES = {"linear": (1, 0), "conv": (2, 3, 1, 0)}  # conv: [out, in, kh, kw] -> [kh, kw, in, out]


def _to_flax(value: np.ndarray, layout: str) -> np.ndarray:
    return value.transpose(_FLAX_AXES[layout]) if layout in _FLAX_AXES else value


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
    return value.transpose(np.argsort(_FLAX_AXES[layout])) if layout in _FLAX_AXES else value


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout not in _FLAX_AXES:
        return tuple(shape)
    return tuple(int(shape[i]) for i in np.argsort(_FLAX_AXES[layout]))


def _get(tree: Mapping, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def meta_key_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every key (and its PyTorch shape) of Meta's DINOv3 state dict for this config."""
    pure = nnx.to_pure_dict(nnx.state(abstract_vit(config.replace(scan_blocks=False))))
    shapes = {key: _torch_shape(_get(pure, path).shape, layout) for key, path, layout in _top_table(config)}
    for i in range(config.depth):
        for suffix, path, layout in _block_table(config):
            shapes[f"blocks.{i}.{suffix}"] = _torch_shape(_get(pure["blocks"][i], path).shape, layout)
        if config.qkv_bias and config.mask_k_bias:
            shapes[f"blocks.{i}.attn.qkv.bias_mask"] = (3 * config.embed_dim,)
    return shapes


def meta_key_paths(config: ViTConfig) -> dict[str, tuple]:
    """Every key of Meta's DINOv3 backbone state dict -> its path in the Flax backbone's state.

    Block paths are ``("blocks", i, ...)``; with ``scan_blocks`` the block parameters live at
    ``("blocks", ...)`` and ``i`` indexes their leading axis. Includes the RoPE periods buffer
    (not a parameter on either side).
    """
    paths = {key: path for key, path, _ in _top_table(config)}
    for i in range(config.depth):
        for suffix, path, _ in _block_table(config):
            paths[f"blocks.{i}.{suffix}"] = ("blocks", i) + path
    return paths


def head_key_paths(config: HeadConfig) -> dict[str, tuple]:
    """Every key of a DINOv3 ``DINOHead`` state dict (no weight norm) -> its Flax state path."""
    paths = {}
    for i in range(config.nlayers):  # Linear at even indices, GELU between (no BatchNorm)
        paths[f"mlp.{2 * i}.weight"] = ("mlp", i, "kernel")
        if config.mlp_bias:
            paths[f"mlp.{2 * i}.bias"] = ("mlp", i, "bias")
    paths["last_layer.weight"] = ("last_layer",)
    return paths


def infer_config(state: Mapping[str, np.ndarray], **overrides: Any) -> ViTConfig:
    """Architecture of a Meta-format state dict; execution and RoPE settings from ``overrides``.

    num_heads comes from ``rope_embed.periods`` (head_dim / 4 entries) when present, else from
    ``overrides`` or 64-wide heads (all DINOv3 sizes).
    """
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight"):
        if key not in state:
            raise CheckpointError(f"cannot infer the architecture: missing key {key!r}")
    dim = int(state["cls_token"].shape[-1])
    patch_w = state["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    swiglu = "blocks.0.mlp.w1.weight" in state
    hidden = int(state["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
    fc = "w1" if swiglu else "fc1"
    fields: dict[str, Any] = dict(
        embed_dim=dim,
        depth=depth,
        patch_size=int(patch_w.shape[-1]),
        in_chans=int(patch_w.shape[1]),
        n_storage_tokens=int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        # The model masks the key third only when the file's mask does and no key bias is kept.
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in state and not _keeps_key_bias(state),
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=f"blocks.0.mlp.{fc}.bias" in state,
        ffn_layer="swiglu" if swiglu else "mlp",
        ffn_ratio=4.0 if swiglu else hidden / dim,
        ffn_hidden_dim=hidden if swiglu else None,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
    )
    if "rope_embed.periods" in state:
        fields["num_heads"] = dim // (4 * int(state["rope_embed.periods"].shape[0]))
    elif "num_heads" not in overrides:
        fields["num_heads"] = max(dim // 64, 1)
    if not swiglu and int(dim * fields["ffn_ratio"]) != hidden:
        fields["ffn_hidden_dim"] = hidden
    fields.update(overrides)
    return ViTConfig(**fields)


def _keeps_key_bias(state: Mapping[str, np.ndarray]) -> bool:
    """Whether any block's qkv bias, with its bias_mask applied, has a nonzero key third."""
    for key, bias in state.items():
        if key.endswith(".attn.qkv.bias"):
            mask = state.get(key + "_mask")
            applied = np.asarray(bias, np.float32) * (1.0 if mask is None else np.asarray(mask, np.float32))
            dim = applied.shape[0] // 3
            if np.any(applied[dim : 2 * dim] != 0):
                return True
    return False


def check_keys(state: Mapping[str, np.ndarray], config: ViTConfig, optional: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError listing unknown, missing and mis-shaped keys (Meta format).

    A qkv bias may come with DINOv3's ``bias_mask`` whether or not the model masks keys (the
    mask is applied to the bias on import), and a k-masked model's file may lack it.
    """
    expected = meta_key_shapes(config)
    if config.qkv_bias:
        masks = {f"blocks.{i}.attn.qkv.bias_mask": (3 * config.embed_dim,) for i in range(config.depth)}
        expected.update(masks)
        optional = tuple(optional) + tuple(masks)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state) - set(optional))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if unknown:
        problems.append(f"unknown keys {_listing(unknown)}")
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if misshaped:
        problems.append(f"mis-shaped keys {_listing(misshaped)}")
    if problems:
        raise CheckpointError("state dict does not match ViTConfig: " + "; ".join(problems))
    for key in expected:
        if key.endswith(".bias_mask") and key in state and not np.all(np.isfinite(state[key])):
            raise CheckpointError(f"{key}: not finite (an uninitialised DINOv3 LinearKMaskedBias buffer)")


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def meta_to_backbone(state: Mapping[str, np.ndarray], config: ViTConfig) -> VisionTransformer:
    """Build the Flax backbone from a Meta-format state dict (exact copy, float32)."""
    optional = ("mask_token", "rope_embed.periods")
    check_keys(state, config, optional)
    state = _fold_bias_masks(state, config)
    state.setdefault("mask_token", np.zeros((1, config.embed_dim), np.float32))
    state.setdefault(
        "rope_embed.periods",
        rope_periods(config.head_dim, config.rope_base, config.rope_min_period, config.rope_max_period),
    )
    model = abstract_vit(config)
    graphdef, abstract_state = nnx.split(model)
    pure = nnx.to_pure_dict(abstract_state)

    def put(path: tuple, value: np.ndarray) -> None:
        _set(pure, path, jnp.asarray(value, _get(pure, path).dtype))

    for key, path, layout in _top_table(config):
        put(path, _to_flax(state[key], layout))
    rows = _block_table(config)
    if config.scan_blocks:
        for suffix, path, layout in rows:
            stacked = np.stack([_to_flax(state[f"blocks.{i}.{suffix}"], layout) for i in range(config.depth)])
            put(("blocks",) + path, stacked)
    else:
        for i in range(config.depth):
            for suffix, path, layout in rows:
                put(("blocks", i) + path, _to_flax(state[f"blocks.{i}.{suffix}"], layout))
    nnx.replace_by_pure_dict(abstract_state, pure)
    return nnx.merge(graphdef, abstract_state)


def _fold_bias_masks(state: Mapping[str, np.ndarray], config: ViTConfig) -> StateDict:
    """Multiply each qkv bias by the file's ``bias_mask``: the bias DINOv3 actually applies.

    Meta's released ViT-S/B/L checkpoints store an all-zero mask (and zero biases), not the
    (1, 0, 1) thirds a k-masked model uses; folding makes every third exact either way. A key
    third that survives the file's mask is not harmless (under RoPE, q . R(p) b_k depends on the
    key's position p), so a model that would mask it (``mask_k_bias``) refuses the file.
    """
    state = dict(state)
    for i in range(config.depth):
        mask = state.get(f"blocks.{i}.attn.qkv.bias_mask")
        bias = f"blocks.{i}.attn.qkv.bias"
        if mask is not None:
            state[bias] = (np.asarray(state[bias], np.float32) * mask).astype(np.float32)
        if config.qkv_bias and config.mask_k_bias and bias in state:
            key_third = state[bias][config.embed_dim : 2 * config.embed_dim]
            if np.any(key_third != 0):
                raise CheckpointError(
                    f"{bias}: the file applies a key bias (max |b_k| {np.abs(key_third).max():.3g}), but the "
                    "model masks it (mask_k_bias=True) and would drop it; convert with mask_k_bias=False"
                )
    return state


def backbone_to_meta(model: VisionTransformer) -> StateDict:
    """Meta DINOv3 state dict (numpy float32, PyTorch layouts) of a Flax backbone."""
    c = model.config
    pure = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    out: StateDict = {}
    for key, path, layout in _top_table(c):
        out[key] = _to_torch(_get(pure, path), layout)
    for i in range(c.depth):
        block = jax.tree.map(lambda a: a[i], pure["blocks"]) if c.scan_blocks else pure["blocks"][i]
        for suffix, path, layout in _block_table(c):
            out[f"blocks.{i}.{suffix}"] = _to_torch(_get(block, path), layout)
        if c.qkv_bias and c.mask_k_bias:
            out[f"blocks.{i}.attn.qkv.bias_mask"] = k_bias_mask(c.embed_dim)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Heads


def infer_head_config(state: Mapping[str, np.ndarray], **overrides: Any) -> HeadConfig:
    """HeadConfig of a DINOv3 DINOHead state dict (``mlp.{0,2,4}``, ``last_layer``)."""
    linear = sorted(int(m.group(1)) for k in state if (m := re.match(r"mlp\.(\d+)\.weight$", k)))
    if not linear:
        raise CheckpointError(f"head state dict has no mlp.N.weight keys: {_listing(sorted(state))}")
    weight_norm = "last_layer.weight_v" in state or "last_layer.parametrizations.weight.original1" in state
    last = _head_last_weight(state)
    fields = dict(
        in_dim=int(state[f"mlp.{linear[0]}.weight"].shape[1]),
        nlayers=len(linear),
        hidden_dim=int(state[f"mlp.{linear[0]}.weight"].shape[0]) if len(linear) > 1 else 2048,
        bottleneck_dim=int(last.shape[1]),
        out_dim=int(last.shape[0]),
        mlp_bias=f"mlp.{linear[0]}.bias" in state,
        weight_norm=weight_norm,
    )
    fields.update(overrides)
    return HeadConfig(**fields)


def _head_last_weight(state: Mapping[str, np.ndarray]) -> np.ndarray:
    for key in ("last_layer.weight", "last_layer.weight_v", "last_layer.parametrizations.weight.original1"):
        if key in state:
            return state[key]
    raise CheckpointError(f"head state dict has no last_layer weight: {_listing(sorted(state))}")


def torch_to_head(state: Mapping[str, np.ndarray], config: HeadConfig | None = None) -> DINOHead:
    """Build a DINOHead from a DINOv3/DINOv2 head state dict (weight norm requires g == 1)."""
    state = dict(state)
    if "last_layer.parametrizations.weight.original0" in state:
        state["last_layer.weight_g"] = state.pop("last_layer.parametrizations.weight.original0")
        state["last_layer.weight_v"] = state.pop("last_layer.parametrizations.weight.original1")
    config = config or infer_head_config(state)
    last_keys = ["last_layer.weight_g", "last_layer.weight_v"] if config.weight_norm else ["last_layer.weight"]
    expected = [k for k in head_key_paths(config) if not k.startswith("last_layer.")] + last_keys
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        raise CheckpointError(f"head state dict: unknown keys {_listing(unknown)}, missing keys {_listing(missing)}")
    if config.weight_norm and not np.allclose(state["last_layer.weight_g"], 1.0):
        raise CheckpointError("last_layer.weight_g: weight-norm gain must be fixed to 1")
    head = nnx.eval_shape(lambda: DINOHead(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(head)
    pure = nnx.to_pure_dict(abstract_state)
    for i in range(config.nlayers):
        w = state[f"mlp.{2 * i}.weight"]
        if w.shape != (config.layer_dims[i + 1], config.layer_dims[i]):
            raise CheckpointError(f"mlp.{2 * i}.weight: shape {w.shape} does not match {config}")
        pure["mlp"][i]["kernel"] = jnp.asarray(w.T, jnp.float32)
        if config.mlp_bias:
            pure["mlp"][i]["bias"] = jnp.asarray(state[f"mlp.{2 * i}.bias"], jnp.float32)
    last = state[last_keys[-1]]
    if last.shape != (config.out_dim, config.bottleneck_dim):
        raise CheckpointError(f"{last_keys[-1]}: shape {last.shape} does not match {config}")
    pure["last_layer"] = jnp.asarray(last.T, jnp.float32)
    nnx.replace_by_pure_dict(abstract_state, pure)
    return nnx.merge(graphdef, abstract_state)


def head_to_torch(head: DINOHead) -> StateDict:
    """DINOv3 DINOHead keys (``weight_g``/``weight_v`` with weight norm, g = 1)."""
    c = head.config
    out: StateDict = {}
    for i, layer in enumerate(head.mlp):
        out[f"mlp.{2 * i}.weight"] = np.array(layer.kernel[...]).T
        if c.mlp_bias:
            out[f"mlp.{2 * i}.bias"] = np.array(layer.bias[...])
    last = np.array(head.last_layer[...]).T
    if c.weight_norm:
        out["last_layer.weight_g"] = np.ones((c.out_dim, 1), np.float32)
        out["last_layer.weight_v"] = last
    else:
        out["last_layer.weight"] = last
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Whole-checkpoint entry points


NORM_EPS_TRAINING = 1e-6  # DINOv3's "layernorm": what its training checkpoints were trained with
NORM_EPS_RELEASED = 1e-5  # DINOv3's "layernormbf16", the hub models' norm


def norm_eps_choice(training_layout: bool, stored: ViTConfig | None, overrides: Mapping[str, Any]) -> tuple[float, str]:
    """The LayerNorm epsilon a converted backbone runs with, and why (for the user to check)."""
    if overrides.get("norm_eps") is not None:
        return float(overrides["norm_eps"]), "given (--norm-eps)"
    if stored is not None:
        return stored.norm_eps, "the file's stored ViTConfig"
    if training_layout:
        return NORM_EPS_TRAINING, "a DINOv3 training checkpoint (teacher/student dict or backbone. keys): its 'layernorm'"
    return NORM_EPS_RELEASED, "a released DINOv3 backbone: the hub models' 'layernormbf16'"


def load_backbone(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    config: ViTConfig | None = None,
    *,
    fmt: str = "auto",
    **overrides: Any,
) -> tuple[VisionTransformer, dict[str, DINOHead]]:
    """Backbone (and any DINO/iBOT heads) from a file or a state dict in Meta/timm/training format.

    Without ``config`` the architecture is inferred from the weights (and, for files written by
    :func:`export_backbone`, from their stored config), and the LayerNorm epsilon is chosen by
    :func:`norm_eps_choice`; ``overrides`` set the other fields. ``in_chans=1`` folds an RGB
    patch embedding for grayscale input (fold_input_channels). A state dict given as a mapping
    may nest the weights under ``"teacher"``, as training checkpoints do.
    """
    model, heads, _ = load_backbone_explained(source, config, fmt=fmt, **overrides)
    return model, heads


def load_backbone_explained(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    config: ViTConfig | None = None,
    *,
    fmt: str = "auto",
    **overrides: Any,
) -> tuple[VisionTransformer, dict[str, DINOHead], str]:
    """load_backbone, plus why the backbone has its LayerNorm epsilon (None-free text)."""
    if isinstance(source, Mapping):
        nested = any(isinstance(v, Mapping) for v in source.values())
        state, stored = (dict(source["teacher"]) if nested else dict(source)), None
    else:
        state, nested = _read_file(source)
        stored = _stored_config(source)
    training_layout = nested or any(k.startswith("backbone.") for k in state)
    backbone, head_states = split_training_checkpoint(state)
    fmt = detect_format(backbone) if fmt == "auto" else fmt
    if fmt == "timm":
        backbone = timm_to_meta(backbone)
    elif fmt != "meta":
        raise CheckpointError(f"unknown format {fmt!r}; use 'auto', 'meta' or 'timm'")
    if config is None:
        eps, why = norm_eps_choice(training_layout, stored, overrides)
        fields = {**overrides, "norm_eps": eps}
        config = stored.replace(**fields) if stored is not None else infer_config(backbone, **fields)
    else:
        why = "given (--norm-eps)" if "norm_eps" in overrides else "the given ViTConfig"
        config = config.replace(**overrides) if overrides else config
    model = meta_to_backbone(fold_input_channels(backbone, config.in_chans), config)
    heads = {name: torch_to_head(sd) for name, sd in head_states.items()}
    return model, heads, why


def fold_input_channels(state: Mapping[str, np.ndarray], in_chans: int) -> dict[str, np.ndarray]:
    """RGB patch embedding → ``in_chans=1`` by summing its kernel over the colour channels.

    A convolution of a grayscale image repeated to 3 channels equals the convolution of the
    single channel with the channel-summed kernel, so natural-image DINOv3 weights serve
    1-channel MRI exactly (BrainDINO's inputs are grayscale repeated to RGB). Other channel
    counts pass through, and check_keys reports any mismatch.
    """
    state = dict(state)
    weight = state.get("patch_embed.proj.weight")
    if in_chans == 1 and weight is not None and weight.ndim == 4 and weight.shape[1] == 3:
        state["patch_embed.proj.weight"] = np.asarray(weight, np.float32).sum(axis=1, keepdims=True)
    return state


def _stored_config(path: str | os.PathLike) -> ViTConfig | None:
    if not os.fspath(path).endswith(".safetensors"):
        return None
    text = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    return ViTConfig.from_dict(json.loads(text)) if text else None


def export_backbone(
    model: VisionTransformer,
    path: str | os.PathLike,
    heads: Mapping[str, DINOHead] | None = None,
) -> StateDict:
    """Write Meta-format safetensors (heads, if given, under ``dino_head.``/``ibot_head.`` with
    the backbone under ``backbone.``, as in DINOv3 training checkpoints). Returns what was written."""
    state = backbone_to_meta(model)
    if heads:
        state = {f"backbone.{k}": v for k, v in state.items()}
        for name, head in heads.items():
            if name not in HEAD_PREFIXES:
                raise CheckpointError(f"head name {name!r} must be one of {HEAD_PREFIXES}")
            state.update({f"{name}.{k}": v for k, v in head_to_torch(head).items()})
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), "format": "dinov3-meta"}
    save_safetensors(state, path, metadata)
    return state


# ----------------------------------------------------------------------------------------------
# Flax side on disk: an Orbax checkpoint of the backbone (and heads) plus their configs as JSON


def save_flax_checkpoint(
    directory: str | os.PathLike,
    model: VisionTransformer,
    heads: Mapping[str, DINOHead] | None = None,
    overwrite: bool = False,
) -> None:
    """Write an Orbax checkpoint ``directory/state``, then ``directory/config.json``.

    The config is written last and atomically: it is what marks the folder as a checkpoint, so
    a save that fails part-way leaves no config beside weights it does not describe. An existing
    folder that is not empty is refused unless ``overwrite``, which replaces a checkpoint there
    (its config first, so that old weights never load with a new config).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: exists and is not a folder")
    if os.path.isdir(directory) and os.listdir(directory):
        if not overwrite:
            raise CheckpointError(f"{directory}: the folder exists and is not empty "
                                  f"({', '.join(sorted(os.listdir(directory))[:5])}); pass overwrite=True "
                                  "(braindino-convert --overwrite) to replace the checkpoint in it")
        config_path = os.path.join(directory, "config.json")
        if os.path.exists(config_path):
            os.unlink(config_path)
        shutil.rmtree(os.path.join(directory, "state"), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    heads = dict(heads or {})
    tree = {"backbone": nnx.to_pure_dict(nnx.state(model))}
    tree.update({name: nnx.to_pure_dict(nnx.state(h)) for name, h in heads.items()})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "state"), tree)
    configs = {"backbone": model.config.to_dict()}
    configs.update({name: dataclasses.asdict(h.config) for name, h in heads.items()})
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".config.json.", delete=False) as f:
        json.dump(configs, f, indent=2)
    os.replace(f.name, os.path.join(directory, "config.json"))


def load_flax_checkpoint(directory: str | os.PathLike) -> tuple[VisionTransformer, dict[str, DINOHead]]:
    """Inverse of :func:`save_flax_checkpoint`, in eval mode (no drop path or RoPE jitter:
    a loaded checkpoint is usually for features; call ``.train()`` to fine-tune)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory}: not a Flax backbone checkpoint (no config.json)")
    with open(config_path) as f:
        configs = json.load(f)
    modules: dict[str, nnx.Module] = {"backbone": abstract_vit(ViTConfig.from_dict(configs["backbone"]))}
    for name, cfg in configs.items():
        if name != "backbone":
            modules[name] = nnx.eval_shape(lambda c=cfg: DINOHead(HeadConfig(**c), rngs=nnx.Rngs(0)))
    splits = {name: nnx.split(m) for name, m in modules.items()}
    target = {name: nnx.to_pure_dict(state) for name, (_, state) in splits.items()}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(directory, "state"), target)
    built = {}
    for name, (graphdef, state) in splits.items():
        nnx.replace_by_pure_dict(state, restored[name])
        built[name] = nnx.merge(graphdef, state)
        built[name].eval()
    backbone = built.pop("backbone")
    return backbone, built
