"""The probe configuration: one ml_collections ConfigDict, its defaults, and its validation.

``configs/probes/*.py`` start from :func:`default_config` and change what their task needs;
the command line overrides any field (``--config.protocol.seeds='(0, 1, 2)'``). The defaults
are BrainDINO's protocol: 128 axial slices of 224 px, the per-slice CLS token mean-pooled over
the volume, and the MLP head LN -> Linear(d, d) -> GELU -> Linear(K).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re

import ml_collections

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import ConfigError
from braindino_jax.probes.errors import ProbeConfigError

TASK_TYPES = ("classification", "regression", "survival", "segmentation")
HEADS = {
    "classification": ("linear", "mlp", "knn"),
    "regression": ("linear", "mlp", "knn"),
    "survival": ("linear", "mlp"),
    "segmentation": ("linear", "transposed_conv"),
}
HEADLINE = {"classification": "auc", "regression": "mae", "survival": "c_index", "segmentation": "dice_mean"}
TOKENS = ("cls", "patch_mean", "cls+patch_mean")
POOLINGS = ("mean", "max", "attention")
MODALITY_FUSIONS = ("average", "concat")
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("auto", "dot_product", "matmul")


def default_config() -> ml_collections.ConfigDict:
    """Every field a probe run reads, with BrainDINO's defaults."""
    c = ml_collections.ConfigDict()
    c.name = "probe"
    c.output_dir = "probe_out"
    # Encoder specs (see braindino_jax.probes.encoders): workdir:, export:, dinov3:, random:,
    # random-active:. All of them run on the same splits and label subsets.
    c.encoders = ("random:vit_base",)
    c.task = ml_collections.ConfigDict(dict(
        name="task",
        type="classification",
        csv="",
        phantoms=0,  # > 0: instead of csv, that many phantom subjects in <output_dir>/phantom_task
        image_columns=("path",),  # several columns: one modality each
        subject_column="subject",
        split_column="split",  # optional in the CSV: train / val / test
        label_column="label",  # class (classification) or number (regression)
        time_column="time",  # survival
        event_column="event",  # survival: 1 = event observed, 0 = censored
        mask_column="mask_path",  # segmentation: label map on the image's voxel grid
        log1p=False,  # regression: fit log1p(target), report metrics on the original scale
        class_names=(),  # class order (default: sorted labels); segmentation: one name per label value
        label_values=(),  # segmentation: label-map value of each class, background first
    ))
    # Preprocessing: the data-prep library's PrepConfig fields, plus the model input size.
    prep = PrepConfig()
    c.input = ml_collections.ConfigDict(dict(
        target_spacing=prep.target_spacing,
        interpolation=prep.interpolation,
        four_d_policy=prep.four_d_policy,
        mask_method=prep.mask_method,
        mask_percentile=prep.mask_percentile,
        clip_percentiles=prep.clip_percentiles,
        min_foreground_fraction=prep.min_foreground_fraction,
        margin=prep.margin,
        n_slices=128,  # sampled uniformly between the first and last foreground slice
        size=224,  # in-plane framing square of the slices (pixels)
        image_size=224,  # model input; slices are resampled to it when it differs from size
    ))
    c.extract = ml_collections.ConfigDict(dict(
        batch_size=128,  # slices per forward pass (rounded up to a multiple of the devices)
        dtype="float32",  # matmul dtype of the encoder: float32 | bfloat16
        attention="auto",  # auto (matmul on CPU, else the model's) | dot_product | matmul
        workers=2,  # preprocessing processes (0: in the main process)
        cache_dir="",  # default: <output_dir>/feature_cache
        progress=True,
    ))
    c.features = ml_collections.ConfigDict(dict(
        token="cls",  # cls | patch_mean | cls+patch_mean (concatenated)
        pooling="mean",  # over a volume's slices: mean | max | attention (learned with the head)
        modalities="average",  # several image columns: average | concat (segmentation: per patch)
    ))
    c.heads = ("mlp",)
    c.train = ml_collections.ConfigDict(dict(
        learning_rates=(1e-3,),  # grid searched on val, with the weight decays
        weight_decays=(1e-4,),
        epochs=300,
        batch_size=256,
        patience=30,  # epochs without a better val score before stopping
        standardize=True,  # z-score features with the training set's statistics
    ))
    c.knn = ml_collections.ConfigDict(dict(ks=(1, 3, 5, 10, 20, 50)))
    c.segmentation = ml_collections.ConfigDict(dict(
        layers=(2, 5, 8, 11),  # blocks whose patch features feed the decoder
        steps=1500,
        batch_size=16,  # slices per step
        learning_rate=1e-3,
        weight_decay=1e-4,
        eval_every=100,
        patience=5,  # evaluations without a better val Dice before stopping
        channels=64,  # transposed_conv decoder width
    ))
    c.protocol = ml_collections.ConfigDict(dict(
        label_fractions=(1.0,),  # of the training subjects, stratified
        seeds=(0,),
        split_seed=0,  # subject-level splits when the CSV has none
        val_fraction=0.15,
        test_fraction=0.2,
        bootstrap=1000,  # resamples for the headline metric's 95% CI (0: none)
        max_failure_fraction=0.2,  # stop when more volumes than this fail to preprocess
    ))
    c.visualize = ml_collections.ConfigDict(dict(
        enabled=True,
        n_volumes=2,  # test volumes shown in the PCA and similarity figures
        n_slices=3,  # slices per volume in those figures
        # Similarity maps' reference patch: (slice, row, col), the slice counted over all shown
        # slices, row and col on the patch grid; () = the central brain patch of the middle slice.
        reference=(),
        tsne=True,
    ))
    return c


def csv_task_config(name: str, task_type: str, csv: str | None, heads: tuple[str, ...],
                    label_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)) -> ml_collections.ConfigDict:
    """What the shipped CSV task configs share: a task read from ``csv`` (default task.csv) with
    these heads and label fractions, three seeds, and a learning-rate grid."""
    c = default_config()
    c.name = c.task.name = name
    c.output_dir = f"probe_out/{name}"
    c.task.type = task_type
    c.task.csv = csv or "task.csv"
    c.heads = heads
    c.train.learning_rates = (1e-3, 1e-2)
    c.protocol.label_fractions = label_fractions
    c.protocol.seeds = (0, 1, 2)
    return c


def prep_config(config: ml_collections.ConfigDict) -> PrepConfig:
    """The data-prep PrepConfig of ``config.input`` (so probes preprocess like pretraining)."""
    i = config.input
    return PrepConfig(
        target_spacing=None if i.target_spacing is None else tuple(float(s) for s in i.target_spacing),
        interpolation=i.interpolation,
        four_d_policy=i.four_d_policy,
        mask_method=i.mask_method,
        mask_percentile=float(i.mask_percentile),
        clip_percentiles=tuple(float(p) for p in i.clip_percentiles),
        min_foreground_fraction=float(i.min_foreground_fraction),
        n_slices=i.n_slices,
        size=i.size,
        margin=i.margin,
    )


def _fail(field: str, reason: str) -> None:
    raise ProbeConfigError(f"config.{field}: {reason}")


def _positive_int(config: ml_collections.ConfigDict, field: str, minimum: int = 1) -> None:
    value = config[field.split(".")[0]][field.split(".")[1]]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, f"expected an integer >= {minimum}, got {value!r}")


def _strings(value, field: str, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        _fail(field, f"expected a tuple of strings, got {value!r}")
    if not value and not allow_empty:
        _fail(field, "must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            _fail(f"{field}[{i}]", f"expected a non-empty string, got {item!r}")
    return tuple(value)


def validate(config: ml_collections.ConfigDict, need_task: bool = True) -> None:
    """Raise ProbeConfigError naming the first invalid field (before anything is loaded).

    ``need_task=False``: a config that names no task CSV is valid (figures of given volumes).
    """
    expected = default_config()
    for section in expected:
        if section not in config:
            _fail(section, "missing (start configs from braindino_jax.probes.config.default_config)")
        if isinstance(expected[section], ml_collections.ConfigDict):
            unknown = sorted(set(config[section]) - set(expected[section]))
            if unknown:
                _fail(f"{section}.{unknown[0]}", f"unknown field (known: {sorted(expected[section])})")
    unknown = sorted(set(config) - set(expected))
    if unknown:
        _fail(unknown[0], f"unknown field (known: {sorted(expected)})")

    t = config.task
    if t.type not in TASK_TYPES:
        _fail("task.type", f"expected one of {TASK_TYPES}, got {t.type!r}")
    _positive_int(config, "task.phantoms", 0)
    if need_task and not t.csv and not t.phantoms:
        _fail("task.csv", "no task CSV given")
    if not t.name or "," in t.name:
        _fail("task.name", f"expected a non-empty name without commas, got {t.name!r}")
    _strings(t.image_columns, "task.image_columns")
    if len(set(t.image_columns)) != len(t.image_columns):
        _fail("task.image_columns", f"columns repeat: {tuple(t.image_columns)}")
    _strings(t.class_names, "task.class_names", allow_empty=True)
    if t.type == "segmentation":
        values = tuple(t.label_values)
        if values and (len(values) < 2 or len(set(values)) != len(values)
                       or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            _fail("task.label_values", f"expected >= 2 distinct integers (background first), got {values!r}")
        if t.class_names and values and len(t.class_names) != len(values):
            _fail("task.class_names", f"{len(t.class_names)} names for {len(values)} label values")
    if t.log1p and t.type != "regression":
        _fail("task.log1p", "only regression targets can be log1p-transformed")
    _strings(config.encoders, "encoders")
    if len(set(config.encoders)) != len(config.encoders):
        _fail("encoders", f"encoders repeat: {tuple(config.encoders)}")

    try:
        prep_config(config).validate()
    except (ConfigError, TypeError, ValueError) as err:
        field = str(err).split(":")[0].replace("PrepConfig.", "")
        _fail(f"input.{field}", str(err).split(": ", 1)[-1])
    if config.input.n_slices is None:
        if t.type != "segmentation":
            _fail("input.n_slices", "a fixed slice count is needed for volume features (None only for segmentation)")
    _positive_int(config, "input.image_size", 8)

    _positive_int(config, "extract.batch_size")
    _positive_int(config, "extract.workers", 0)
    if config.extract.dtype not in DTYPES:
        _fail("extract.dtype", f"expected one of {DTYPES}, got {config.extract.dtype!r}")
    if config.extract.attention not in ATTENTIONS:
        _fail("extract.attention", f"expected one of {ATTENTIONS}, got {config.extract.attention!r}")
    f = config.features
    for field, allowed in (("token", TOKENS), ("pooling", POOLINGS), ("modalities", MODALITY_FUSIONS)):
        if f[field] not in allowed:
            _fail(f"features.{field}", f"expected one of {allowed}, got {f[field]!r}")

    heads = _strings(config.heads, "heads")
    for i, head in enumerate(heads):
        if head not in HEADS[t.type]:
            _fail(f"heads[{i}]", f"{head!r} is not a {t.type} head; choose from {HEADS[t.type]}")
    if "knn" in heads and f.pooling == "attention":
        _fail("features.pooling", "attention pooling is learned with a head; kNN needs mean or max")

    tr = config.train
    for field in ("learning_rates", "weight_decays"):
        values = tuple(tr[field])
        if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            _fail(f"train.{field}", f"expected a non-empty tuple of numbers >= 0, got {values!r}")
    if not all(v > 0 for v in tr.learning_rates):
        _fail("train.learning_rates", f"learning rates must be > 0, got {tuple(tr.learning_rates)}")
    for field in ("train.epochs", "train.batch_size", "train.patience"):
        _positive_int(config, field)
    ks = tuple(config.knn.ks)
    if "knn" in heads and (not ks or not all(isinstance(k, int) and k >= 1 for k in ks)):
        _fail("knn.ks", f"expected a non-empty tuple of integers >= 1, got {ks!r}")

    s = config.segmentation
    if t.type == "segmentation":
        layers = tuple(s.layers)
        if not layers or not all(isinstance(v, int) for v in layers):
            _fail("segmentation.layers", f"expected a non-empty tuple of block indices, got {layers!r}")
        for field in ("segmentation.steps", "segmentation.batch_size", "segmentation.eval_every",
                      "segmentation.patience", "segmentation.channels"):
            _positive_int(config, field)
        if not s.learning_rate > 0:
            _fail("segmentation.learning_rate", f"must be > 0, got {s.learning_rate}")

    p = config.protocol
    fractions = tuple(p.label_fractions)
    if not fractions or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in fractions):
        _fail("protocol.label_fractions", f"expected fractions in (0, 1], got {fractions!r}")
    if len(set(fractions)) != len(fractions):
        _fail("protocol.label_fractions", f"fractions repeat: {fractions}")
    seeds = tuple(p.seeds)
    if not seeds or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds) or len(set(seeds)) != len(seeds):
        _fail("protocol.seeds", f"expected distinct integers, got {seeds!r}")
    for field in ("val_fraction", "test_fraction"):
        if not 0 < p[field] < 1:
            _fail(f"protocol.{field}", f"expected a fraction in (0, 1), got {p[field]!r}")
    if p.val_fraction + p.test_fraction >= 1:
        _fail("protocol.test_fraction", "val_fraction + test_fraction must leave training subjects")
    _positive_int(config, "protocol.bootstrap", 0)
    if not 0 <= p.max_failure_fraction <= 1:
        _fail("protocol.max_failure_fraction", f"expected a fraction in [0, 1], got {p.max_failure_fraction!r}")
    _positive_int(config, "visualize.n_volumes", 0)
    _positive_int(config, "visualize.n_slices")
    reference = tuple(config.visualize.reference)
    if reference and (len(reference) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                     for v in reference)):
        _fail("visualize.reference", f"expected () or (slice, row, col) integers >= 0, got {reference!r}")


# ----------------------------------------------------------------------------------------------
# Loading a config file and applying command-line overrides


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` → its ``get_config(arg)``, with ``a.b=value`` overrides applied
    (values parsed for the field's type), then validated."""
    m = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec, flags=re.S)
    if not m or not os.path.isfile(m.group(1)):
        raise ProbeConfigError(f"--config {spec!r}: expected an existing path/to/config.py[:arg]")
    module_spec = importlib.util.spec_from_file_location("_probe_config", m.group(1))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ProbeConfigError(f"--config {m.group(1)}: has no get_config(arg)")
    config = module.get_config(m.group(2))
    apply_overrides(config, overrides)
    validate(config)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``a.b=value`` items in order (see apply_override)."""
    for item in overrides:
        field, eq, value = item.partition("=")
        if not eq:
            raise ProbeConfigError(f"--config.{item}: expected --config.FIELD=VALUE")
        apply_override(config, field, value)


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside parentheses, brackets and quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _parse_like(text: str, current):
    """A command-line string as a value of ``current``'s type."""

    def literal(s: str):
        try:
            return ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return s

    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    if isinstance(current, (int, float)):
        value = literal(text)
        if text.strip().lower() == "none":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {text!r}")
        return value
    if isinstance(current, (tuple, list)):
        stripped = text.strip()
        if stripped.startswith(("(", "[")):
            value = literal(stripped)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"expected a tuple, got {text!r}")
            return tuple(value)
        return tuple(literal(p) if not (current and isinstance(current[0], str)) else p
                     for p in _split_top_level(stripped))
    return literal(text)


def apply_override(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Set ``config.<field>`` (dotted) from a command-line string; errors name the field."""
    *parents, leaf = field.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ProbeConfigError(f"config.{'.'.join(parents[: i + 1])}: no such section")
        node = node[name]
    if leaf not in node:
        raise ProbeConfigError(f"config.{field}: unknown field (known: {sorted(node)})")
    try:
        node[leaf] = _parse_like(text, node[leaf])
    except (TypeError, ValueError) as err:
        raise ProbeConfigError(f"config.{field}: cannot set {text!r}: {err}") from err
