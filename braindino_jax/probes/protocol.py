"""The probe protocol: one config → features of every encoder → heads on the same splits → files.

For each encoder (loaded one at a time), every volume of the task is featurised (or read from
the cache), rows whose volumes failed to preprocess are set aside (and listed), and for every
label fraction × seed the training subjects are subsampled (stratified, seeded: the same
subsets for every encoder), each head is fitted with model selection on val and scored on
test, with a bootstrap 95% CI for the headline metric. Figures are drawn per encoder, and the
encoder's fingerprint is checked again at the end: the probe must leave its parameters as
they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from braindino_jax.probes import visualize
from braindino_jax.probes.aggregation import fuse_modalities, pool_slices, row_inputs, slice_tokens
from braindino_jax.probes.cache import FeatureCache
from braindino_jax.probes.config import HEADLINE, prep_config, validate
from braindino_jax.probes.encoders import Encoder, fingerprint, load_encoder, parse_spec, resolve_attention
from braindino_jax.probes.errors import ProbeConfigError, ProbeInputError
from braindino_jax.probes.features import (
    Extraction,
    ExtractionSettings,
    FeatureExtractor,
    VolumeJob,
    extract_features,
)
from braindino_jax.probes.heads import (
    Objective,
    ProbeNet,
    TrainSettings,
    knn_predict,
    make_objective,
    predict,
    standardize,
    train_head,
)
from braindino_jax.probes.metrics import bootstrap_ci, confusion
from braindino_jax.probes.phantom_tasks import TISSUE_CLASSES, write_phantom_task
from braindino_jax.probes.results import write_results
from braindino_jax.probes.segmentation import (
    SegmentationSettings,
    SegmentationVolume,
    class_indices,
    dice_scores,
    distinct_slices,
    predict_volume,
    stack_blocks,
    train_decoder,
)
from braindino_jax.probes.survival import plot_kaplan_meier
from braindino_jax.probes.tasks import Task, assign_splits, label_subset, read_task, subjects_of
from braindino_jax.probes.volumes import read_probe_volume

log = logging.getLogger(__name__)


def resolve_task_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.task``, with the phantom task written and its CSV filled in when asked for."""
    task = ml_collections.ConfigDict(config.task.to_dict())
    if task.phantoms:
        task.csv = str(write_phantom_task(Path(config.output_dir) / "phantom_task", task.phantoms))
        if task.type == "segmentation" and not task.class_names:
            task.class_names = TISSUE_CLASSES
    return task


def extraction_settings(config: ml_collections.ConfigDict) -> ExtractionSettings:
    layers = tuple(config.segmentation.layers) if config.task.type == "segmentation" else ()
    return ExtractionSettings(prep=prep_config(config), image_size=config.input.image_size, layers=layers,
                              batch_size=config.extract.batch_size)


def probe_encoder(spec: str, config: ml_collections.ConfigDict) -> Encoder:
    """Load an encoder under the config's extraction settings."""
    return load_encoder(spec, config.extract.dtype, resolve_attention(config.extract.attention, config.extract.dtype))


def slug(spec: str) -> str:
    """A file-name-safe form of an encoder spec."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:80]


def run_probe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Run the whole protocol of ``config``; returns the summary (also written to summary.json)."""
    validate(config)
    started = time.perf_counter()
    for spec in config.encoders:
        parse_spec(spec)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_config = resolve_task_config(config)
    task = read_task(task_config)
    splits = assign_splits(task, config.protocol.val_fraction, config.protocol.test_fraction,
                           config.protocol.split_seed)
    settings = extraction_settings(config)
    cache = FeatureCache(config.extract.cache_dir or out_dir / "feature_cache")
    jobs_by_row = [[VolumeJob(path, row.mask_path) for path in row.paths] for row in task.rows]
    records: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    encoders: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for spec in config.encoders:
        encoder = probe_encoder(spec, config)
        log.info("encoder %s: ViT embed_dim %d, depth %d, patch %d; fingerprint %s", spec, encoder.config.embed_dim,
                 encoder.config.depth, encoder.config.patch_size, encoder.fingerprint[:12])
        extraction = extract_features(encoder, [j for jobs in jobs_by_row for j in jobs], settings, cache,
                                      workers=config.extract.workers, progress=config.extract.progress)
        failures.update({job.path: reason for job, reason in extraction.failures.items()})
        valid = [i for i, jobs in enumerate(jobs_by_row) if all(j in extraction.features for j in jobs)]
        if task.type == "segmentation":
            misaligned = _misaligned(task, valid, jobs_by_row, extraction)
            failures.update(misaligned)
            valid = [i for i in valid if not any(j.path in misaligned for j in jobs_by_row[i])]
        _check_failures(task, valid, failures, config.protocol.max_failure_fraction)
        fit_start = time.perf_counter()
        sweep = _segmentation_sweeps if task.type == "segmentation" else _head_sweeps
        new_records, new_runs = sweep(config, task, task_config, splits, valid, jobs_by_row, extraction,
                                      encoder, out_dir)
        records += new_records
        runs += new_runs
        if config.visualize.enabled:
            _feature_figures(config, task, splits, valid, jobs_by_row, extraction, encoder,
                             _figure_dir(out_dir, encoder))
        if fingerprint(encoder.model) != encoder.fingerprint:
            raise RuntimeError(f"encoder {spec!r}: parameters changed during the probe (they must stay frozen)")
        encoders[spec] = {"fingerprint": encoder.fingerprint, "vit_config": encoder.config.to_dict(),
                          "extraction": extraction.stats, "heads_s": time.perf_counter() - fit_start}
    summary = {
        "name": config.name,
        "task": {"name": task.name, "type": task.type, "csv": task.csv, "rows": len(task.rows),
                 "subjects": len(splits), "class_names": list(task.class_names or task_config.class_names),
                 "split_subjects": {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}},
        "encoders": encoders,
        "failures": [{"path": p, "reason": r} for p, r in sorted(failures.items())],
        "runs": runs,
        "cache": {"dir": str(cache.directory), "hits": cache.hits, "misses": cache.misses},
        "config": config.to_dict(),
        "wall_s": time.perf_counter() - started,
    }
    summary["files"] = {k: str(v) for k, v in write_results(out_dir, records, HEADLINE[task.type], summary).items()}
    return summary


def _check_failures(task: Task, valid: list[int], failures: dict[str, str], max_fraction: float) -> None:
    for reason in failures.values():
        log.warning("volume failed, row left out: %s", reason)
    lost = len(task.rows) - len(valid)
    if lost and lost > max_fraction * len(task.rows):
        raise ProbeInputError(f"{task.csv}: {lost} of {len(task.rows)} rows have volumes that failed to "
                              f"preprocess (more than config.protocol.max_failure_fraction); first: "
                              f"{next(iter(failures.values()))}")


def _row_splits(task: Task, splits: dict[str, str], valid: list[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(split per valid row, subject per valid row, training subjects that have valid rows)."""
    subjects = np.array([task.rows[i].subject for i in valid])
    row_split = np.array([splits[s] for s in subjects])
    present = set(subjects.tolist())
    train_subjects = [s for s in subjects_of(task) if splits[s] == "train" and s in present]
    return row_split, subjects, train_subjects


def _record(records, encoder, task, head, fraction, seed, values: dict[str, float]) -> None:
    for metric, value in values.items():
        records.append({"encoder": encoder, "task": task, "head": head, "label_fraction": float(fraction),
                        "seed": int(seed), "metric": metric, "value": float(value)})


def _with_ci(values: dict[str, float], task: Task, y: np.ndarray, predictions: np.ndarray, n: int,
             seed: int) -> dict[str, float]:
    headline = HEADLINE[task.type]
    lo, hi = bootstrap_ci(headline, y, predictions, n, seed)
    return {**values, f"{headline}_ci95_low": lo, f"{headline}_ci95_high": hi}


def _head_sweeps(config, task, task_config, splits, valid, jobs_by_row, extraction: Extraction,
                 encoder: Encoder, out_dir: Path):
    f = config.features
    inputs = np.stack([row_inputs([extraction.features[j] for j in jobs_by_row[i]], f.token, f.pooling,
                                  f.modalities) for i in valid])
    targets = task.targets[valid]
    row_split, subjects, train_subjects = _row_splits(task, splits, valid)
    attention = f.pooling == "attention"
    n_modalities = len(task.image_columns)
    n_classes = len(task.class_names)
    records, runs = [], []
    km_drawn = set()
    for fraction in config.protocol.label_fractions:
        for seed in config.protocol.seeds:
            subset = set(label_subset(train_subjects, task, fraction, seed))
            tr = np.flatnonzero(np.isin(subjects, list(subset)))
            va, te = np.flatnonzero(row_split == "val"), np.flatnonzero(row_split == "test")
            objective = make_objective(task.type, targets[tr], n_classes, task_config.log1p)
            x_tr, x_va, x_te = inputs[tr], inputs[va], inputs[te]
            if config.train.standardize:
                x_tr, x_va, x_te = standardize(x_tr, x_va, x_te)
            for head in config.heads:
                if head == "knn":
                    values, run = _knn(config, objective, inputs, targets, tr, va, te, task, seed)
                    for k, score in run.pop("per_k").items():
                        _record(records, encoder.spec, task.name, f"knn_k{k}", fraction, seed,
                                {HEADLINE[task.type]: score})
                    predictions = None
                else:
                    predictions, run = _fit_best(config, head, objective, x_tr, targets[tr], x_va, targets[va],
                                                 x_te, n_modalities, attention, seed)
                    values = objective.metrics(targets[te], predictions)
                    values = _with_ci(values, task, targets[te], predictions, config.protocol.bootstrap, seed)
                    if task.type == "classification":
                        run["confusion_matrix"] = confusion(targets[te], predictions)
                _record(records, encoder.spec, task.name, head, fraction, seed, values)
                runs.append({"encoder": encoder.spec, "head": head, "label_fraction": fraction, "seed": seed,
                             "train_subjects": len(subset), "train_rows": len(tr), "val_rows": len(va),
                             "test_rows": len(te), **run})
                if (task.type == "survival" and predictions is not None and fraction == max(config.protocol.label_fractions)
                        and head not in km_drawn and config.visualize.enabled):
                    km_drawn.add(head)
                    path = _figure_dir(out_dir, encoder) / f"kaplan_meier_{head}.png"
                    plot_kaplan_meier(targets[te, 0], targets[te, 1].astype(bool), predictions, path,
                                      f"{encoder.spec} / {head} head: test rows split at the median risk")
    return records, runs


def _fit_best(config, head, objective: Objective, x_tr, y_tr, x_va, y_va, x_te, n_modalities, attention, seed):
    """Train one head per (learning rate, penalty) of the grid; the best on val predicts test."""
    best = None
    in_dim = x_tr.shape[-1]
    for lr in config.train.learning_rates:
        for wd in config.train.weight_decays:
            net = ProbeNet(head, in_dim, objective.out_dim, attention=attention, n_modalities=n_modalities,
                           fusion=config.features.modalities, rngs=nnx.Rngs(seed))
            settings = TrainSettings(learning_rate=float(lr), weight_decay=float(wd), epochs=config.train.epochs,
                                     batch_size=config.train.batch_size, patience=config.train.patience, seed=seed)
            net, run = train_head(net, objective, (x_tr, y_tr), (x_va, y_va), settings)
            key = (run["val_score"], -run["val_loss"])
            if best is None or key > best[0]:
                best = (key, net, {**run, "learning_rate": float(lr), "weight_decay": float(wd)})
    _, net, run = best
    return predict(net, objective, x_te), run


def _knn(config, objective: Objective, inputs, targets, tr, va, te, task: Task, seed):
    """kNN for every k (up to the training set's size); k chosen on val, all reported."""
    ks = sorted({min(int(k), len(tr)) for k in config.knn.ks})
    per_k, best = {}, None
    for k in ks:
        val_score = objective.score(targets[va], knn_predict(objective, inputs[tr], targets[tr], inputs[va], k))
        test_pred = knn_predict(objective, inputs[tr], targets[tr], inputs[te], k)
        per_k[k] = objective.metrics(targets[te], test_pred)[HEADLINE[task.type]]
        key = val_score if math.isfinite(val_score) else -math.inf
        if best is None or key > best[0]:
            best = (key, k, test_pred)
    _, k, test_pred = best
    values = _with_ci(objective.metrics(targets[te], test_pred), task, targets[te], test_pred,
                      config.protocol.bootstrap, seed)
    return {**values, "k": float(k)}, {"k": k, "val_score": best[0], "per_k": per_k}


def _segmentation_sweeps(config, task, task_config, splits, valid, jobs_by_row, extraction: Extraction,
                         encoder: Encoder, out_dir: Path):
    layers = tuple(config.segmentation.layers)
    label_values = tuple(task_config.label_values) or tuple(sorted(set(np.concatenate(
        [np.unique(extraction.features[jobs_by_row[i][0]]["labels"]) for i in valid]).tolist())))
    n_classes = len(label_values)
    class_names = tuple(task_config.class_names) or tuple(f"class_{v}" for v in label_values)
    if len(class_names) != n_classes:
        raise ProbeInputError(f"{task.csv}: config.task.class_names has {len(class_names)} names but the masks "
                              f"hold {n_classes} label values {label_values}; set config.task.label_values")
    volumes = []
    for i in valid:
        per_modality = [extraction.features[j] for j in jobs_by_row[i]]
        arrays = per_modality[0]
        where = f"{task.csv} line {task.rows[i].line}, column {task_config.mask_column!r}"
        try:
            classes = class_indices(arrays["labels"], label_values, where)
        except ValueError as err:
            raise ProbeInputError(str(err)) from err
        distinct = distinct_slices(arrays["slice_indices"])
        patches = fuse_modalities(np.stack([stack_blocks(a, layers) for a in per_modality], axis=-2),
                                  config.features.modalities)
        volumes.append(SegmentationVolume(patches[distinct], classes[distinct]))
    row_split, subjects, train_subjects = _row_splits(task, splits, valid)
    s = config.segmentation
    records, runs = [], []

    def pick(rows: np.ndarray) -> list[SegmentationVolume]:
        return [volumes[j] for j in rows]

    for fraction in config.protocol.label_fractions:
        for seed in config.protocol.seeds:
            subset = set(label_subset(train_subjects, task, fraction, seed))
            tr = np.flatnonzero(np.isin(subjects, list(subset)))
            va, te = np.flatnonzero(row_split == "val"), np.flatnonzero(row_split == "test")
            settings = SegmentationSettings(steps=s.steps, batch_size=s.batch_size, learning_rate=s.learning_rate,
                                            weight_decay=s.weight_decay, eval_every=s.eval_every,
                                            patience=s.patience, channels=s.channels, seed=seed)
            for head in config.heads:
                decoder, run = train_decoder(head, pick(tr), pick(va), n_classes, settings)
                predictions = [predict_volume(decoder, v.features) for v in pick(te)]
                dice = np.array([dice_scores(v.classes, p, n_classes) for v, p in zip(pick(te), predictions)])
                per_volume = np.nanmean(dice, axis=1)
                values = {f"dice_{name}": float(np.nanmean(dice[:, c])) for c, name in enumerate(class_names[1:])}
                values["dice_mean"] = float(np.nanmean(per_volume))
                lo, hi = bootstrap_ci("mean", per_volume, per_volume, config.protocol.bootstrap, seed)
                values.update(dice_mean_ci95_low=lo, dice_mean_ci95_high=hi)
                _record(records, encoder.spec, task.name, head, fraction, seed, values)
                runs.append({"encoder": encoder.spec, "head": head, "label_fraction": fraction, "seed": seed,
                             "train_subjects": len(subset), "train_volumes": len(tr), "val_volumes": len(va),
                             "test_volumes": len(te), **run})
                if (config.visualize.enabled and seed == config.protocol.seeds[0]
                        and fraction == max(config.protocol.label_fractions) and len(te)):
                    _segmentation_figure(config, task, valid[te[0]], pick(te)[0], predictions[0], class_names,
                                         encoder, head, out_dir)
    return records, runs


def _misaligned(task: Task, valid: list[int], jobs_by_row, extraction: Extraction) -> dict[str, str]:
    """Rows whose image columns disagree, as failures (path -> reason). Segmentation fuses the
    columns patch by patch, so each must keep the same slices, framed alike: co-registered series
    with one brain mask, which the label map framed with each column shows."""
    out = {}
    for i in valid:
        first, *others = [extraction.features[j] for j in jobs_by_row[i]]
        for column, job, arrays in zip(task.image_columns[1:], jobs_by_row[i][1:], others):
            if (not np.array_equal(arrays["slice_indices"], first["slice_indices"])
                    or not np.array_equal(arrays["labels"], first["labels"])):
                out[job.path] = (f"{task.csv} line {task.rows[i].line}: column {column!r} ({job.path}) is not "
                                 f"aligned with {task.image_columns[0]!r} (other slices kept, or another "
                                 "foreground frame); segmentation with several image columns needs "
                                 "co-registered series with the same brain mask")
    return out


def _figure_dir(out_dir: Path, encoder: Encoder) -> Path:
    path = out_dir / "figures" / f"{slug(encoder.spec)}-{encoder.fingerprint[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shown_slices(n: int, count: int) -> np.ndarray:
    """``count`` slice indices spread over the middle of a volume of ``n`` slices."""
    return np.unique(np.linspace(0.2 * (n - 1), 0.8 * (n - 1), min(count, n)).round().astype(int))


def _segmentation_figure(config, task, row_index, volume: SegmentationVolume, prediction, class_names, encoder,
                         head, out_dir) -> None:
    row = task.rows[row_index]
    read = read_probe_volume(row.paths[0], prep_config(config))
    pixels = read.pixels[distinct_slices(read.slice_indices)]
    shown = _shown_slices(len(pixels), config.visualize.n_slices)
    visualize.plot_segmentation(pixels[shown], volume.classes[shown], prediction[shown],
                                _figure_dir(out_dir, encoder) / f"segmentation_{head}.png",
                                f"{encoder.spec} / {head} decoder: test subject {row.subject}", class_names)


def volume_figures(encoder: Encoder, paths: list[str], names: list[str], config: ml_collections.ConfigDict,
                   figures: Path) -> None:
    """PCA and reference-similarity maps of a few slices of each volume (one figure for all)."""
    final = ExtractionSettings(prep=prep_config(config), image_size=config.input.image_size,
                               layers=(encoder.config.depth - 1,), batch_size=config.extract.batch_size)
    extractor = FeatureExtractor(encoder, final)
    pixels, patches, titles = [], [], []
    for path, name in zip(paths, names):
        volume = read_probe_volume(path, final.prep)
        shown = _shown_slices(len(volume.pixels), config.visualize.n_slices)
        volume.pixels = volume.pixels[shown]
        pixels.append(volume.pixels)
        patches.append(extractor.embed(volume)[f"patch_{encoder.config.depth - 1}"].astype(np.float32))
        titles += [f"{name} z={volume.slice_indices[j]}" for j in shown]
    pixels, patches = np.concatenate(pixels), np.concatenate(patches)
    reference = tuple(config.visualize.reference)
    if reference:
        bounds = (len(pixels),) + patches.shape[1:3]
        if any(v >= n for v, n in zip(reference, bounds)):
            raise ProbeConfigError(f"config.visualize.reference: {reference} is outside the {bounds[0]} shown "
                                   f"slices x {bounds[1]} x {bounds[2]} patches")
    else:
        middle = min(config.visualize.n_slices, len(pixels)) // 2
        foreground = visualize.patch_foreground(pixels[middle:middle + 1], patches.shape[1])[0]
        reference = (middle, *visualize.central_patch(foreground))
    figures.mkdir(parents=True, exist_ok=True)
    visualize.plot_pca(pixels, patches, figures / "pca.png", encoder.spec, titles)
    visualize.plot_similarity(pixels, patches, reference, figures / "similarity.png", encoder.spec, titles)


def tsne_figure(config: ml_collections.ConfigDict, task: Task, valid: list[int], jobs_by_row, extraction: Extraction,
                path: Path, title: str) -> bool:
    """t-SNE of the volume features (attention pooling shown as mean pooling), coloured by label."""
    f = config.features
    pooling = "mean" if f.pooling == "attention" else f.pooling
    features = np.stack([fuse_modalities(pool_slices(np.stack(
        [slice_tokens(extraction.features[j], f.token) for j in jobs_by_row[i]]), pooling), f.modalities)
        for i in valid])
    targets = task.targets[valid]
    if task.type == "survival":
        labels, names = targets[:, 1].astype(int), ("censored", "event")
    else:
        labels, names = targets, task.class_names
    return visualize.plot_tsne(features, labels, path, title, names)


def _feature_figures(config, task, splits, valid, jobs_by_row, extraction: Extraction, encoder: Encoder,
                     figures: Path) -> None:
    shown = [i for i in valid if splits[task.rows[i].subject] == "test"][: config.visualize.n_volumes]
    if shown:
        volume_figures(encoder, [task.rows[i].paths[0] for i in shown], [task.rows[i].subject for i in shown],
                       config, figures)
    if config.visualize.tsne and task.type != "segmentation":
        tsne_figure(config, task, valid, jobs_by_row, extraction, figures / "tsne.png", f"{encoder.spec}: {task.name}")



def figures(config: ml_collections.ConfigDict, specs: list[str], volumes: list[str], out_dir: Path) -> list[Path]:
    """``braindino-probe visualize``: per encoder, PCA and similarity maps of ``volumes`` (or of
    the config task's first test volumes, plus the t-SNE of all its volumes)."""
    written = []
    if not volumes:
        task = read_task(resolve_task_config(config))
        splits = assign_splits(task, config.protocol.val_fraction, config.protocol.test_fraction,
                               config.protocol.split_seed)
        jobs_by_row = [[VolumeJob(path) for path in row.paths] for row in task.rows]
        cache = FeatureCache(config.extract.cache_dir or Path(config.output_dir) / "feature_cache")
    for spec in specs:
        encoder = probe_encoder(spec, config)
        target = out_dir / f"{slug(encoder.spec)}-{encoder.fingerprint[:8]}"
        if volumes:
            volume_figures(encoder, volumes, [Path(v).name.split(".")[0] for v in volumes], config, target)
        else:
            settings = dataclasses.replace(extraction_settings(config), layers=())
            extraction = extract_features(encoder, [j for jobs in jobs_by_row for j in jobs], settings, cache,
                                          workers=config.extract.workers, progress=config.extract.progress)
            valid = [i for i, jobs in enumerate(jobs_by_row) if all(j in extraction.features for j in jobs)]
            _feature_figures(config, task, splits, valid, jobs_by_row, extraction, encoder, target)
        written += sorted(target.glob("*.png"))
    return written
