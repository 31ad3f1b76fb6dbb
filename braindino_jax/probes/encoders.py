"""Encoder specs: which frozen backbone a probe runs, named on the command line or in a config.

  workdir:PATH[@STEP]       teacher backbone of a training run (latest step, or STEP)
  export:PATH               backbone export: an Orbax Flax checkpoint folder (save_flax_checkpoint)
  dinov3:PATH               converted DINOv3/timm weights: a Flax folder, or a raw .pth/.safetensors
  random:ARCH[@SEED]        the architecture at random init (seed 0 by default)
  random-active:ARCH[@SEED] the same with every LayerScale gamma set to 1

ARCH is a size name (vit_small, vit_base, vit_large, vit_giant), optionally with ViTConfig
overrides in parentheses (``vit_small(embed_dim=192,depth=4,num_heads=3)``), a JSON file of
ViTConfig fields (or a Flax checkpoint's ``config.json``), or ``like=SPEC``: the architecture of
another encoder spec, e.g. ``random:like=workdir:runs/a@1``. The seed is the last ``@INT``.

At LayerScale 1e-5 the blocks of a random init are nearly silent, so its tokens are about
LayerNorm(patch embedding): a raw-pixel baseline. The active control shows what untrained
attention over context adds.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from braindino_jax.models.config import VIT_SIZES, ModelConfigError, ViTConfig, vit_config
from braindino_jax.models.convert import CheckpointError, load_backbone, load_flax_checkpoint
from braindino_jax.models.vit import VisionTransformer, abstract_vit
from braindino_jax.probes.errors import ProbeConfigError

KINDS = ("workdir", "export", "dinov3", "random", "random-active")
# Fields that change how parameters are evaluated, not what they are (left out of fingerprints).
_EXECUTION_FIELDS = ("dtype", "attention", "attention_implementation", "remat", "scan_blocks", "drop_path_rate")


@dataclasses.dataclass
class Encoder:
    """A loaded frozen backbone and the identity its cached features are filed under."""

    spec: str
    model: VisionTransformer
    fingerprint: str  # sha256 of the architecture and every parameter's bytes

    @property
    def config(self) -> ViTConfig:
        return self.model.config


def parse_spec(spec: str) -> tuple[str, str]:
    """``"kind:rest"`` → (kind, rest), checking the kind."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ProbeConfigError(f"encoder {spec!r}: expected KIND:ARG with KIND one of {KINDS}")
    return kind, rest


def _split_suffix(rest: str) -> tuple[str, int | None]:
    """``"x@12"`` → ("x", 12); no integer suffix → (rest, None)."""
    m = re.fullmatch(r"(.*)@(\d+)", rest, flags=re.S)
    return (m.group(1), int(m.group(2))) if m else (rest, None)


def resolve_arch(arch: str, spec: str) -> ViTConfig:
    """The ViTConfig an ARCH string names (see the module docstring)."""
    if arch.startswith("like="):
        return load_encoder(arch[len("like="):]).config
    if arch.endswith(".json"):
        try:
            with open(arch) as f:
                fields = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeConfigError(f"encoder {spec!r}: cannot read the ViTConfig JSON {arch}: {err}") from err
        fields = fields.get("backbone", fields)
        try:
            return ViTConfig.from_dict(fields)
        except (ModelConfigError, TypeError) as err:
            raise ProbeConfigError(f"encoder {spec!r}: {arch}: {err}") from err
    m = re.fullmatch(r"(\w+)(?:\((.*)\))?", arch, flags=re.S)
    if not m or m.group(1) not in VIT_SIZES:
        raise ProbeConfigError(
            f"encoder {spec!r}: architecture {arch!r} is not a size name {sorted(VIT_SIZES)} "
            "(optionally with (field=value,...)), a .json ViTConfig, or like=SPEC"
        )
    overrides = {}
    for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ProbeConfigError(f"encoder {spec!r}: override {item!r} is not field=value")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    try:
        return vit_config(m.group(1), **overrides)
    except (ModelConfigError, TypeError) as err:
        raise ProbeConfigError(f"encoder {spec!r}: {err}") from err


def _random_model(config: ViTConfig, seed: int, active: bool) -> VisionTransformer:
    config = config.replace(scan_blocks=False, drop_path_rate=0.0)
    model = VisionTransformer(config, rngs=nnx.Rngs(seed))
    if active:
        for block in model.blocks:
            for scale in (block.ls1, block.ls2):
                if scale is not None:
                    scale.gamma[...] = np.ones(scale.gamma.shape, np.float32)
    return model


def _load_workdir(path: str, step: int | None) -> VisionTransformer:
    # Imported here: the training package is heavier, and only this encoder kind needs it.
    try:
        from braindino_jax.train.checkpoint import load_teacher_backbone
    except ImportError as err:
        raise ProbeConfigError(f"workdir:{path}: reading training runs needs braindino_jax.train ({err})") from err
    try:
        return load_teacher_backbone(path, step)
    except CheckpointError as err:
        raise ProbeConfigError(f"workdir:{path}: {err}") from err


def _load_weights(kind: str, path: str, spec: str) -> VisionTransformer:
    if kind == "export" or os.path.isdir(path):
        if not os.path.isdir(path):
            raise ProbeConfigError(f"encoder {spec!r}: {path} is not a checkpoint folder")
        return load_flax_checkpoint(path)[0]
    if not os.path.isfile(path):
        raise ProbeConfigError(f"encoder {spec!r}: no such file or folder {path}")
    return load_backbone(path)[0]


def resolve_attention(attention: str, dtype: str) -> str | None:
    """A probe config's ``extract.attention``: "auto" is matmul attention on the CPU backend,
    where XLA's dot_product_attention is 1.8-3.8x slower (see benchmarks/probe_throughput.py),
    and the model's own setting (None) everywhere else (cuDNN on GPU)."""
    if attention != "auto":
        return attention
    return "matmul" if jax.default_backend() == "cpu" else None


def load_encoder(spec: str, dtype: str | None = None, attention: str | None = None) -> Encoder:
    """Load the backbone a spec names, in eval mode, with matmuls in ``dtype`` and the given
    attention implementation ("dot_product" or "matmul") if given.

    Raises ProbeConfigError naming the spec for a malformed spec or unreadable weights.
    """
    kind, rest = parse_spec(spec)
    try:
        if kind == "workdir":
            path, step = _split_suffix(rest)
            model = _load_workdir(path, step)
        elif kind in ("export", "dinov3"):
            model = _load_weights(kind, rest, spec)
        else:
            arch, seed = _split_suffix(rest)
            model = _random_model(resolve_arch(arch, spec), seed or 0, kind == "random-active")
    except (CheckpointError, ModelConfigError, OSError, ValueError) as err:
        if isinstance(err, ProbeConfigError):
            raise
        raise ProbeConfigError(f"encoder {spec!r}: {err}") from err
    model = with_execution(model, dtype=dtype or model.config.dtype, attention=attention or model.config.attention)
    return Encoder(spec=spec, model=model, fingerprint=fingerprint(model))


def with_execution(model: VisionTransformer, **changes) -> VisionTransformer:
    """The same parameters under other execution settings (dtype, attention), in eval mode.

    Block parameters stacked for ``nnx.scan`` are unstacked, so that intermediate layers can be
    read block by block. With a 16-bit dtype every Linear and Conv returns float32: XLA's CPU
    backend runs bf16 x bf16 -> bf16 products on a slow path but bf16 x bf16 -> f32 ones on
    its fast one (2-4x faster on AVX512-BF16/AMX; benchmarks/probe_throughput.py), and the
    float32 result is also the more accurate (the residual stream is float32 anyway).
    """
    config = model.config.replace(scan_blocks=False, remat=False, drop_path_rate=0.0, **changes)
    state = nnx.state(model)
    if model.config.scan_blocks:
        pure = nnx.to_pure_dict(state)
        blocks = pure.pop("blocks")
        pure["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(config.depth)}
        graphdef, target = nnx.split(abstract_vit(config))
        nnx.replace_by_pure_dict(target, pure)
        state = target
    else:
        graphdef, _ = nnx.split(abstract_vit(config))
    out = nnx.merge(graphdef, state)
    if config.dtype != "float32":
        for _, module in nnx.iter_modules(out):
            if isinstance(module, (nnx.Linear, nnx.Conv)):
                module.preferred_element_type = jnp.float32
    out.eval()
    return out


def architecture(config: ViTConfig) -> dict:
    """The ViTConfig fields that determine the parameters (execution settings left out)."""
    return {k: v for k, v in config.to_dict().items() if k not in _EXECUTION_FIELDS}


def fingerprint(model: VisionTransformer) -> str:
    """sha256 over the architecture and every parameter (path, dtype, shape, bytes), in path order."""
    digest = hashlib.sha256(json.dumps(architecture(model.config), sort_keys=True).encode())
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
