"""A probe task from a CSV: its rows, typed targets, and subject-level splits without leakage.

Columns: one path column per modality (``path`` by default), ``subject``, the target columns of
the task type (``label``; ``time`` and ``event``; ``mask_path``) and an optional ``split``
(train / val / test). Relative paths are relative to the CSV's folder. Every row of a subject
lands in the same split; when the CSV gives no split, subjects are split with scikit-learn,
stratified by class (classification), event (survival) or target quartile (regression).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections import Counter

import ml_collections
import numpy as np
from sklearn.model_selection import train_test_split

from braindino_jax.probes.errors import ProbeInputError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class TaskRow:
    line: int  # line in the CSV (the header is line 1)
    subject: str
    paths: tuple[str, ...]  # one per image column
    mask_path: str | None
    split: str | None  # from the CSV, if it has a split column


@dataclasses.dataclass
class Task:
    name: str
    type: str
    csv: str
    image_columns: tuple[str, ...]
    rows: list[TaskRow]
    # classification: int class index [R]; regression: float [R]; survival: float [R, 2]
    # (time, event); segmentation: unused zeros [R].
    targets: np.ndarray
    class_names: tuple[str, ...] = ()

    def where(self, line: int, column: str | None = None) -> str:
        return f"{self.csv} line {line}" + (f", column {column!r}" if column else "")


def _resolve(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProbeInputError(f"{where}: expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise ProbeInputError(f"{where}: expected {what}, got {text!r}")
    return value


def _event(text: str, where: str) -> float:
    value = text.strip().lower()
    if value in ("1", "1.0", "true", "yes"):
        return 1.0
    if value in ("0", "0.0", "false", "no"):
        return 0.0
    raise ProbeInputError(f"{where}: expected an event flag 1/0 (or true/false), got {text!r}")


def read_task(config: ml_collections.ConfigDict) -> Task:
    """Read and check ``config`` (a probe config's ``task`` section)'s CSV.

    Raises ProbeInputError naming the file, line and column for a missing column, an empty
    subject, a target of the wrong type, a missing image or mask file, or an unknown split.
    """
    path = os.fspath(config.csv)
    if not os.path.isfile(path):
        raise ProbeInputError(f"{path}: task CSV not found (config.task.csv)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        records = list(reader)
    required = [config.subject_column, *config.image_columns]
    if config.type in ("classification", "regression"):
        required.append(config.label_column)
    elif config.type == "survival":
        required += [config.time_column, config.event_column]
    else:
        required.append(config.mask_column)
    missing = [c for c in required if c not in header]
    if missing:
        raise ProbeInputError(f"{path}: missing required column {missing[0]!r} (the CSV has {list(header)})")
    if not records:
        raise ProbeInputError(f"{path}: no data rows")
    base = os.path.dirname(os.path.abspath(path))
    has_split = config.split_column in header
    rows, raw_targets = [], []
    for n, record in enumerate(records, start=2):

        def where(column: str, n: int = n) -> str:
            return f"{path} line {n}, column {column!r}"

        if None in record or any(record.get(c) is None for c in header):
            raise ProbeInputError(f"{path} line {n}: expected {len(header)} fields, got a different count")
        subject = record[config.subject_column].strip()
        if not subject:
            raise ProbeInputError(f"{where(config.subject_column)}: empty subject")
        paths = []
        for column in config.image_columns:
            value = record[column].strip()
            if not value:
                raise ProbeInputError(f"{where(column)}: empty image path")
            resolved = _resolve(value, base)
            if not os.path.isfile(resolved):
                raise ProbeInputError(f"{where(column)}: image file not found: {resolved}")
            paths.append(resolved)
        mask_path = None
        if config.type == "segmentation":
            value = record[config.mask_column].strip()
            mask_path = _resolve(value, base) if value else ""
            if not value or not os.path.isfile(mask_path):
                raise ProbeInputError(f"{where(config.mask_column)}: mask file not found: {mask_path or '(empty)'}")
        split = None
        if has_split:
            split = record[config.split_column].strip().lower() or None
            if split is not None and split not in SPLITS:
                raise ProbeInputError(f"{where(config.split_column)}: expected one of {SPLITS}, got {split!r}")
        if config.type == "classification":
            label = record[config.label_column].strip()
            if not label:
                raise ProbeInputError(f"{where(config.label_column)}: empty class label")
            raw_targets.append(label)
        elif config.type == "regression":
            value = _number(record[config.label_column], where(config.label_column), "a number")
            if config.log1p and value <= -1:
                raise ProbeInputError(f"{where(config.label_column)}: log1p needs a target > -1, got {value}")
            raw_targets.append(value)
        elif config.type == "survival":
            time = _number(record[config.time_column], where(config.time_column), "a survival time")
            if time < 0:
                raise ProbeInputError(f"{where(config.time_column)}: survival time must be >= 0, got {time}")
            raw_targets.append((time, _event(record[config.event_column], where(config.event_column))))
        else:
            raw_targets.append(0.0)
        rows.append(TaskRow(line=n, subject=subject, paths=tuple(paths), mask_path=mask_path, split=split))
    if has_split and len({r.split is None for r in rows}) > 1:
        first = next(r for r in rows if r.split is None)
        raise ProbeInputError(f"{path} line {first.line}, column {config.split_column!r}: empty split "
                              "(give every row a split, or none)")

    class_names: tuple[str, ...] = ()
    if config.type == "classification":
        found = sorted(set(raw_targets))
        class_names = tuple(config.class_names) or tuple(found)
        unknown = [(r.line, t) for r, t in zip(rows, raw_targets) if t not in class_names]
        if unknown:
            raise ProbeInputError(f"{path} line {unknown[0][0]}, column {config.label_column!r}: class "
                                  f"{unknown[0][1]!r} is not in config.task.class_names {class_names}")
        if len(set(raw_targets)) < 2:
            raise ProbeInputError(f"{path}: column {config.label_column!r} holds a single class {found}")
        targets = np.array([class_names.index(t) for t in raw_targets], np.int32)
    else:
        targets = np.asarray(raw_targets, np.float64)
    return Task(name=config.name, type=config.type, csv=path, image_columns=tuple(config.image_columns),
                rows=rows, targets=targets, class_names=class_names)


# ----------------------------------------------------------------------------------------------
# Splits


def subjects_of(task: Task) -> list[str]:
    """Subjects in order of first appearance."""
    return list(dict.fromkeys(r.subject for r in task.rows))


def subject_strata(task: Task, subjects: list[str]) -> np.ndarray | None:
    """One stratum per subject: its most common class, its event flag of the first row, or the
    quartile of its mean target; None for segmentation."""
    by_subject: dict[str, list[int]] = {}
    for i, row in enumerate(task.rows):
        by_subject.setdefault(row.subject, []).append(i)
    if task.type == "classification":
        return np.array([Counter(task.targets[by_subject[s]].tolist()).most_common(1)[0][0] for s in subjects])
    if task.type == "survival":
        return np.array([int(task.targets[by_subject[s][0], 1]) for s in subjects])
    if task.type == "regression":
        means = np.array([task.targets[by_subject[s]].mean() for s in subjects])
        edges = np.quantile(means, [0.25, 0.5, 0.75])
        return np.searchsorted(edges, means, side="right")
    return None


def _split_off(items: list[str], strata: np.ndarray | None, size: float | int, seed: int) -> tuple[list[str], list[str]]:
    """(rest, taken) with ``size`` (fraction or count) taken, stratified when every stratum
    allows it; otherwise a plain random split with the same seed."""
    try:
        rest, taken = train_test_split(items, test_size=size, stratify=strata, random_state=seed)
    except ValueError:  # a stratum too small for the requested split
        rest, taken = train_test_split(items, test_size=size, random_state=seed)
    return list(rest), list(taken)


def assign_splits(task: Task, val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """subject → split. The CSV's split column wins; without val subjects, val is carved out of
    train. Raises ProbeInputError when a subject appears in two splits or a split is empty."""
    subjects = subjects_of(task)
    if task.rows[0].split is not None:
        splits: dict[str, str] = {}
        for row in task.rows:
            previous = splits.setdefault(row.subject, row.split)
            if previous != row.split:
                raise ProbeInputError(f"{task.where(row.line)}: subject {row.subject!r} is in split "
                                      f"{row.split!r} here and in {previous!r} on an earlier line (leakage)")
        if "val" not in splits.values():
            train = [s for s in subjects if splits[s] == "train"]
            strata = subject_strata(task, train)
            _, val = _split_off(train, strata, val_fraction / (1 - test_fraction), seed)
            splits.update({s: "val" for s in val})
    else:
        if len(subjects) < 3:
            raise ProbeInputError(f"{task.csv}: {len(subjects)} subjects cannot make train, val and test splits")
        n_test = max(1, round(test_fraction * len(subjects)))
        n_val = max(1, round(val_fraction * len(subjects)))
        rest, test = _split_off(subjects, subject_strata(task, subjects), n_test, seed)
        train, val = _split_off(rest, subject_strata(task, rest), n_val, seed)
        splits = {**{s: "train" for s in train}, **{s: "val" for s in val}, **{s: "test" for s in test}}
    for name in SPLITS:
        if name not in splits.values():
            raise ProbeInputError(f"{task.csv}: the {name} split has no subjects")
    return splits


def label_subset(
    train_subjects: list[str], task: Task, fraction: float, seed: int
) -> list[str]:
    """``fraction`` of the training subjects, stratified (at least one per class), seeded."""
    if fraction >= 1.0:
        return list(train_subjects)
    strata = subject_strata(task, train_subjects)
    n = max(1, round(fraction * len(train_subjects)))
    if strata is not None and task.type == "classification":
        n = max(n, len(set(strata.tolist())))
    if n >= len(train_subjects):
        return list(train_subjects)
    taken = set(_split_off(train_subjects, strata, n, seed)[1])
    return [s for s in train_subjects if s in taken]
