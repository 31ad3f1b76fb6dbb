"""The training configuration: ml_collections defaults, loading with overrides, validation.

A config file (``configs/*.py``) defines ``get_config(arg=None) -> ConfigDict`` starting from
:func:`default_config` and changing what its experiment needs. :func:`load_config` reads such a
file with ``--config.a.b=v``-style overrides, and :func:`build_spec` validates the whole config
against the devices and the data *before anything compiles*, turning it into the typed settings
the train step uses. Every error names the offending field (``config.train.batch_size: ...``).

Derived, never set by hand: the augmentation's channel count and dtype follow the model
(``model.vit.in_chans``/``dtype``), the iBOT mask grid follows the global crop and patch size,
and on GPU the attention implementation defaults to cuDNN in bf16.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import jax
import ml_collections

from braindino_jax.data.augment import AugmentConfig
from braindino_jax.data.pipeline import PipelineConfig, PipelineError, expand_shards, first_record
from braindino_jax.models.config import ModelConfigError, ViTConfig, vit_config, VIT_SIZES
from braindino_jax.models.heads import HeadConfig
from braindino_jax.train.schedules import Schedules, scaled_lr

_DERIVED_AUGMENT = ("channels", "dtype")
CENTERINGS = ("sinkhorn_knopp", "softmax")
GRAM_NEGATIVES = ("keep", "remove", "remove_teacher")


class ConfigError(ValueError):
    """A training config field is invalid; the message starts with the field's full name."""


def _head(out_dim: int = 65536) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        out_dim=out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3, weight_norm=False,
        dtype="float32"))


def default_config() -> ml_collections.ConfigDict:
    """DINOv3's ViT-B/16 recipe as DESIGN.md gives it; config files override from here."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        arch="vit_base",
        # ViTConfig overrides on top of the named size (see braindino_jax/models/config.py).
        vit=ml_collections.ConfigDict(dict(
            patch_size=16, in_chans=3, qkv_bias=False, n_storage_tokens=4, layerscale_init=1e-5,
            norm_eps=1e-6, drop_path_rate=0.1, dtype="bfloat16", attention="dot_product",
            attention_implementation="auto", remat=False, scan_blocks=False)),
        dino_head=_head(),
        ibot_head=_head(),
        # Start student and teacher from these weights: a braindino-convert / backbone-export
        # folder, a DINOv3 .pth/.safetensors file, or a training work directory.
        init_from="",
    ))
    c.data = ml_collections.ConfigDict(dict(
        shards=("demo_out/slices-*.array_record",),
        weights=ml_collections.FieldReference(None, field_type=tuple),
        image_size=0,          # 0: read from the first record
        num_workers=0, read_threads=2, worker_buffer_size=2, device_prefetch=2,
    ))
    augment = {k: v for k, v in dataclasses.asdict(AugmentConfig()).items()
               if k not in _DERIVED_AUGMENT}
    c.augment = ml_collections.ConfigDict(augment)
    c.masking = ml_collections.ConfigDict(dict(sample_probability=0.5, ratio_range=(0.1, 0.5)))
    c.loss = ml_collections.ConfigDict(dict(
        dino_weight=1.0, ibot_weight=1.0, koleo_weight=0.1, student_temp=0.1,
        centering="sinkhorn_knopp", sinkhorn_iterations=3, center_momentum=0.9))
    c.teacher = ml_collections.ConfigDict(dict(
        momentum=0.992, final_momentum=1.0, temp=0.07, warmup_temp=0.04, warmup_temp_epochs=30.0))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=1e-6, warmup_epochs=10.0, scaling_rule="sqrt_wrt_1024",
        weight_decay=0.04, weight_decay_end=0.4, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        layerwise_decay=0.9, patch_embed_lr_mult=0.2, clip_grad=3.0, freeze_last_layer_epochs=1.0))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=1024, epochs=100.0, epoch_length=1250, seed=0, max_consecutive_skips=3,
        log_every=10))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every=1250, keep=3, keep_every=0, async_save=True))  # keep_every 0: no permanent ones
    # An optional evaluation of the teacher backbone every `every` steps: `hook` names a
    # callable "package.module:function" taking (backbone, step) and returning {name: value}.
    c.eval = ml_collections.ConfigDict(dict(every=0, hook=""))
    c.gram = ml_collections.ConfigDict(dict(
        enabled=False, teacher="", weight=1.0, image_level=True, negatives="keep",
        normalize=True))
    return c


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file (``path[:arg]``), then ``a.b=v`` overrides applied.

    Overrides take the forms ``--config.a.b=v`` or ``a.b=v``; values are parsed as Python
    literals and must keep the field's type (ml_collections checks it).
    """
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"--config: no such file {file!r}")
    spec = importlib.util.spec_from_file_location("_braindino_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {file} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Set one ``[--config.]a.b=value`` on ``config``, with a message naming the field on error."""
    text = item[2:] if item.startswith("--") else item
    text = text[len("config."):] if text.startswith("config.") else text
    name, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected --config.field=value")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    node = config
    parts = name.split(".")
    for part in parts[:-1]:
        if part not in node:
            raise ConfigError(f"config.{name}: no field {part!r} in config.{'.'.join(parts[:-1])}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"config.{name}: no such field")
    current = node[parts[-1]]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, str):
        value = (value,)
    try:
        node[parts[-1]] = value
    except TypeError as exc:
        raise ConfigError(f"config.{name}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Loss weights and settings the step needs (static under jit)."""

    dino_weight: float
    ibot_weight: float
    koleo_weight: float
    student_temp: float
    centering: str
    sinkhorn_iterations: int
    center_momentum: float
    gram_weight: float
    gram_image_level: bool
    gram_negatives: str
    gram_normalize: bool


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """AdamW and parameter-group settings (the per-step values live in ``Schedules``)."""

    b1: float
    b2: float
    eps: float
    clip_grad: float
    layerwise_decay: float
    patch_embed_lr_mult: float


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Everything a run needs, validated: the typed form of a ConfigDict."""

    vit: ViTConfig
    dino_head: HeadConfig
    ibot_head: HeadConfig
    augment: AugmentConfig
    pipeline: PipelineConfig
    schedules: Schedules
    loss: LossSpec
    mesh_shape: tuple[int, int]
    process_count: int
    groups: int            # per-device sets for KoLeo, batch-level Gram and iBOT masks
    batch_size: int
    total_steps: int
    seed: int
    max_consecutive_skips: int
    optim: OptimSpec
    init_from: str
    gram_teacher: str
    gram: bool

    @property
    def group_batch(self) -> int:
        """Samples per group: one device's share of the global batch."""
        return self.batch_size // self.groups

    @property
    def mask_grid(self) -> tuple[int, int]:
        g = self.augment.global_size // self.vit.patch_size
        return (g, g)


def _fail(field: str, reason: str) -> None:
    raise ConfigError(f"config.{field}: {reason}")


def _check_positive(config: ml_collections.ConfigDict, fields: Sequence[str]) -> None:
    for field in fields:
        section, name = field.split(".")
        value = config[section][name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            _fail(field, f"must be a positive number, got {value!r}")


def _vit(config: ml_collections.ConfigDict) -> ViTConfig:
    m = config.model
    if m.arch not in VIT_SIZES:
        _fail("model.arch", f"unknown ViT size {m.arch!r}; choose one of {sorted(VIT_SIZES)}")
    overrides = dict(m.vit)
    if overrides.get("attention_implementation") == "auto":
        gpu = jax.default_backend() == "gpu" and overrides.get("dtype") in ("bfloat16", "float16")
        overrides["attention_implementation"] = "cudnn" if gpu else None
    try:
        return vit_config(m.arch, **overrides)
    except TypeError as exc:
        raise ConfigError(f"config.model.vit: {exc}") from exc
    except ModelConfigError as exc:
        raise ConfigError(f"config.model.vit.{str(exc).removeprefix('ViTConfig.')}") from exc


def _head_config(config: ml_collections.ConfigDict, name: str, in_dim: int) -> HeadConfig:
    try:
        return HeadConfig(in_dim=in_dim, **dict(config.model[name]))
    except (TypeError, ModelConfigError) as exc:
        raise ConfigError(f"config.model.{name}: {str(exc).removeprefix('HeadConfig.')}") from exc


def model_configs(config: ml_collections.ConfigDict) -> tuple[ViTConfig, HeadConfig, HeadConfig]:
    """The backbone and the two head configs of a training config (validated)."""
    vit = _vit(config)
    return (vit, _head_config(config, "dino_head", vit.embed_dim),
            _head_config(config, "ibot_head", vit.embed_dim))


def _augment(config: ml_collections.ConfigDict, vit: ViTConfig) -> AugmentConfig:
    fields = dict(config.augment)
    for derived in _DERIVED_AUGMENT:
        if derived in fields:
            _fail(f"augment.{derived}", f"is derived from config.model.vit ({derived} follows the "
                  "model) and cannot be set")
    aug_dtype = vit.dtype
    try:
        aug = AugmentConfig(**fields, channels=vit.in_chans, dtype=aug_dtype)
        aug.validate()
    except TypeError as exc:
        raise ConfigError(f"config.augment: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"config.augment.{str(exc).removeprefix('AugmentConfig.')}") from exc
    if vit.in_chans not in (1, 3):
        _fail("model.vit.in_chans", f"MRI slices feed 1 or 3 channels, got {vit.in_chans}")
    for field in ("global_size", "local_size"):
        size = getattr(aug, field)
        if size % vit.patch_size:
            _fail(f"augment.{field}", f"{size} is not a multiple of the patch size "
                  f"{vit.patch_size} (config.model.vit.patch_size)")
    return aug


def _mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int]:
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if not isinstance(fsdp, int) or fsdp < 1 or device_count % fsdp:
        _fail("mesh.fsdp", f"must be a positive divisor of the {device_count} devices, got {fsdp!r}")
    if data == -1:
        data = device_count // fsdp
    if not isinstance(data, int) or data < 1 or data * fsdp != device_count:
        _fail("mesh.data", f"data x fsdp = {data} x {fsdp} must equal the {device_count} devices "
              "(or set data=-1)")
    return data, fsdp


def _shards(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    shards = config.data.shards
    if isinstance(shards, str):
        shards = (shards,)
    if not shards:
        _fail("data.shards", "is empty; give one or more ArrayRecord paths or globs")
    for pattern in shards:
        try:
            expand_shards(pattern)
        except PipelineError:
            _fail("data.shards", f"{pattern!r} matches no file")
    return tuple(shards)


def build_spec(config: ml_collections.ConfigDict, device_count: int | None = None,
               process_count: int | None = None, check_data: bool = True) -> TrainSpec:
    """Validate ``config`` for this many devices and processes; the typed settings of the run.

    ``check_data`` reads the first record to check the shards exist and to take the slice
    size when ``data.image_size`` is 0.
    """
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    _check_positive(config, (
        "train.batch_size", "train.epochs", "train.epoch_length", "optim.lr", "loss.student_temp",
        "teacher.temp", "teacher.warmup_temp", "train.max_consecutive_skips", "train.log_every",
        "checkpoint.every", "checkpoint.keep"))
    vit, dino_head, ibot_head = model_configs(config)
    augment = _augment(config, vit)
    mesh_shape = _mesh_shape(config, device_count)

    t = config.train
    batch = t.batch_size
    if batch % device_count:
        _fail("train.batch_size", f"{batch} is not divisible by the {device_count} devices")
    if batch // device_count < 2:
        _fail("train.batch_size", f"{batch} gives {batch // device_count} sample per device; "
              "KoLeo needs at least 2 per device")
    total = int(round(t.epochs * t.epoch_length))
    o, te = config.optim, config.teacher
    warmup = int(round(o.warmup_epochs * t.epoch_length))
    if not 0 <= warmup <= total:
        _fail("optim.warmup_epochs", f"{o.warmup_epochs} epochs ({warmup} steps) is longer than "
              f"the run ({t.epochs} epochs, {total} steps)")
    temp_warmup = int(round(te.warmup_temp_epochs * t.epoch_length))
    if temp_warmup < 0:
        _fail("teacher.warmup_temp_epochs", f"must be >= 0, got {te.warmup_temp_epochs}")
    freeze = int(round(o.freeze_last_layer_epochs * t.epoch_length))
    if not 0 <= freeze <= total:
        _fail("optim.freeze_last_layer_epochs", f"{o.freeze_last_layer_epochs} epochs must lie "
              f"within the run ({t.epochs} epochs)")
    try:
        peak_lr = scaled_lr(o.lr, batch, o.scaling_rule)
    except ValueError as exc:
        raise ConfigError(f"config.optim.{exc}") from exc
    for field in ("momentum", "final_momentum"):
        if not 0 <= te[field] <= 1:
            _fail(f"teacher.{field}", f"must be in [0, 1], got {te[field]}")
    if not 0 < o.layerwise_decay <= 1:
        _fail("optim.layerwise_decay", f"must be in (0, 1], got {o.layerwise_decay}")
    schedules = Schedules(
        total_steps=total, lr=peak_lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
        momentum=te.momentum, momentum_end=te.final_momentum, teacher_temp=te.temp,
        teacher_temp_start=te.warmup_temp, teacher_temp_warmup_steps=temp_warmup,
        freeze_last_layer_steps=freeze)

    lo = config.loss
    if lo.centering not in CENTERINGS:
        _fail("loss.centering", f"must be one of {CENTERINGS}, got {lo.centering!r}")
    if not isinstance(lo.sinkhorn_iterations, int) or lo.sinkhorn_iterations < 1:
        _fail("loss.sinkhorn_iterations", f"must be an int >= 1, got {lo.sinkhorn_iterations!r}")
    g = config.gram
    if g.negatives not in GRAM_NEGATIVES:
        _fail("gram.negatives", f"must be one of {GRAM_NEGATIVES}, got {g.negatives!r}")
    if g.enabled and not g.teacher:
        _fail("gram.teacher", "Gram anchoring needs a Gram teacher: a stage-1 work directory or "
              "backbone export")
    loss = LossSpec(
        dino_weight=lo.dino_weight, ibot_weight=lo.ibot_weight, koleo_weight=lo.koleo_weight,
        student_temp=lo.student_temp, centering=lo.centering,
        sinkhorn_iterations=lo.sinkhorn_iterations, center_momentum=lo.center_momentum,
        gram_weight=g.weight if g.enabled else 0.0, gram_image_level=g.image_level,
        gram_negatives=g.negatives, gram_normalize=g.normalize)

    d = config.data
    shards = _shards(config) if check_data else tuple(d.shards)
    image_size = d.image_size
    if image_size == 0:
        if not check_data:
            _fail("data.image_size", "is 0 (read from the data), but the data is not checked")
        try:
            image_size = int(first_record([p for s in shards for p in expand_shards(s)]).pixels.shape[0])
        except PipelineError as exc:
            raise ConfigError(f"config.data.shards: {exc}") from exc
    mask_grid = (augment.global_size // vit.patch_size,) * 2
    try:
        pipeline = PipelineConfig(
            shards=shards, weights=tuple(d.weights) if d.weights else None, batch_size=batch,
            image_size=image_size, seed=t.seed, num_workers=d.num_workers,
            worker_buffer_size=d.worker_buffer_size, read_threads=d.read_threads,
            device_prefetch=d.device_prefetch, mask_grid=mask_grid,
            mask_sample_probability=config.masking.sample_probability,
            mask_ratio_range=tuple(config.masking.ratio_range),
            mask_groups=device_count // process_count)
        pipeline.validate(process_count)
    except PipelineError as exc:
        field = str(exc).removeprefix("PipelineConfig.")
        raise ConfigError(f"config.data.{field}") from exc
    return TrainSpec(
        vit=vit, dino_head=dino_head, ibot_head=ibot_head, augment=augment, pipeline=pipeline,
        schedules=schedules, loss=loss, mesh_shape=mesh_shape, process_count=process_count,
        groups=device_count, batch_size=batch,
        total_steps=total, seed=t.seed, max_consecutive_skips=t.max_consecutive_skips,
        optim=OptimSpec(b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps, clip_grad=o.clip_grad,
                        layerwise_decay=o.layerwise_decay,
                        patch_embed_lr_mult=o.patch_embed_lr_mult),
        init_from=config.model.init_from, gram_teacher=g.teacher, gram=g.enabled)
