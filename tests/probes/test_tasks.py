"""Task CSVs: typed targets, subject-level splits without leakage, label subsets, bad rows."""

import csv

import ml_collections
import numpy as np
import pytest

from braindino_jax.probes.config import default_config
from braindino_jax.probes.errors import ProbeInputError
from braindino_jax.probes.tasks import assign_splits, label_subset, read_task, subjects_of


def write_csv(folder, rows, header=None):
    header = header or list(rows[0])
    for row in rows:  # read_task only checks that the files exist
        for key in ("path", "mask_path"):
            if row.get(key):
                (folder / row[key]).touch()
    path = folder / "task.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def task_config(path, task_type="classification", **changes) -> ml_collections.ConfigDict:
    c = default_config().task
    c.csv, c.type = str(path), task_type
    for key, value in changes.items():
        c[key] = value
    return c


def sessions(n_subjects=30, per_subject=3, classes=("CN", "MCI", "AD")):
    rows = []
    for s in range(n_subjects):
        for v in range(per_subject):
            rows.append({"path": f"sub{s}_ses{v}.nii.gz", "subject": f"sub-{s}", "label": classes[s % len(classes)]})
    return rows


def test_made_splits_keep_every_subject_on_one_side_and_are_stratified(tmp_path):
    task = read_task(task_config(write_csv(tmp_path, sessions())))
    assert task.class_names == ("AD", "CN", "MCI") and task.targets.dtype == np.int32
    splits = assign_splits(task, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert set(splits) == set(subjects_of(task)) and set(splits.values()) == {"train", "val", "test"}
    by_split = {}
    for row, target in zip(task.rows, task.targets):
        by_split.setdefault(splits[row.subject], []).append((row.subject, target))
    subject_sets = {name: {s for s, _ in rows} for name, rows in by_split.items()}
    assert not (subject_sets["train"] & subject_sets["val"]) and not (subject_sets["train"] & subject_sets["test"])
    assert not (subject_sets["val"] & subject_sets["test"])
    for name, rows in by_split.items():  # stratified: every class on every side
        assert {t for _, t in rows} == {0, 1, 2}, name
    assert len(subject_sets["test"]) == 6 and len(subject_sets["val"]) == 6
    assert assign_splits(task, 0.2, 0.2, seed=0) == splits  # seeded
    assert assign_splits(task, 0.2, 0.2, seed=1) != splits


def test_label_subsets_are_stratified_seeded_and_inside_train(tmp_path):
    task = read_task(task_config(write_csv(tmp_path, sessions(60, 1))))
    splits = assign_splits(task, 0.2, 0.2, seed=0)
    train = [s for s in subjects_of(task) if splits[s] == "train"]
    label = dict(zip((r.subject for r in task.rows), task.targets))
    small = label_subset(train, task, 0.1, seed=0)
    assert set(small) <= set(train) and len(small) == 4
    assert {label[s] for s in small} == {0, 1, 2}  # at least one subject per class
    assert label_subset(train, task, 0.1, seed=0) == small
    assert label_subset(train, task, 0.1, seed=1) != small
    assert label_subset(train, task, 0.01, seed=0) and len(label_subset(train, task, 0.01, seed=0)) == 3
    assert label_subset(train, task, 1.0, seed=3) == train


def test_given_split_column_with_a_subject_on_two_sides_is_leakage(tmp_path):
    rows = sessions(6, 2)
    for row in rows:
        row["split"] = "train" if int(row["subject"][4:]) < 4 else "test"
    rows[1]["split"] = "test"  # sub-0's second session on the other side
    task = read_task(task_config(write_csv(tmp_path, rows)))
    with pytest.raises(ProbeInputError, match=r"task.csv line 3: subject 'sub-0' is in split 'test'.*leakage"):
        assign_splits(task, 0.2, 0.2, seed=0)


def test_given_splits_are_used_and_val_is_carved_from_train(tmp_path):
    rows = sessions(20, 1, classes=("a", "b"))
    for i, row in enumerate(rows):
        row["split"] = "test" if i >= 16 else "train"
    splits = assign_splits(read_task(task_config(write_csv(tmp_path, rows))), 0.2, 0.2, seed=0)
    assert [splits[f"sub-{i}"] for i in range(16, 20)] == ["test"] * 4
    assert sum(v == "val" for v in splits.values()) == 4


def test_typed_targets_for_regression_and_survival(tmp_path):
    rows = [{"path": f"{i}.nii", "subject": f"s{i}", "label": str(i * 1.5), "time": str(10 + i), "event": "1" if i % 2 else "false"}
            for i in range(6)]
    path = write_csv(tmp_path, rows)
    regression = read_task(task_config(path, "regression"))
    np.testing.assert_allclose(regression.targets, np.arange(6) * 1.5)
    survival = read_task(task_config(path, "survival"))
    np.testing.assert_allclose(survival.targets, np.stack([10 + np.arange(6), np.arange(6) % 2], 1))
    assert regression.rows[2].paths == (str(tmp_path / "2.nii"),)  # relative to the CSV's folder


@pytest.mark.parametrize("case, pattern", [
    ("missing file", r"task.csv line 3, column 'path': image file not found: .*gone.nii.gz"),
    ("wrong label type", r"task.csv line 4, column 'label': expected a number, got 'old'"),
    ("missing column", r"task.csv: missing required column 'subject' \(the CSV has \['path', 'label'\]\)"),
    ("bad event", r"task.csv line 2, column 'event': expected an event flag"),
    ("bad split", r"task.csv line 2, column 'split': expected one of \('train', 'val', 'test'\), got 'dev'"),
    ("missing mask", r"task.csv line 2, column 'mask_path': mask file not found"),
    ("empty subject", r"task.csv line 3, column 'subject': empty subject"),
    ("unknown class", r"task.csv line 5, column 'label': class '3' is not in config.task.class_names \('0', '1', '2'\)"),
])
def test_bad_rows_name_the_file_line_and_column(tmp_path, case, pattern):
    rows = [{"path": f"{i}.nii.gz", "subject": f"s{i}", "label": str(i)} for i in range(4)]
    task_type = "regression"
    if case == "missing file":
        write_csv(tmp_path, rows)
        rows[1]["path"] = "gone.nii.gz"
        path = tmp_path / "task.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        if case == "wrong label type":
            rows[2]["label"] = "old"
        elif case == "missing column":
            rows = [{k: v for k, v in r.items() if k != "subject"} for r in rows]
        elif case == "bad event":
            rows = [{**r, "time": "3", "event": "maybe"} for r in rows]
            task_type = "survival"
        elif case == "bad split":
            rows = [{**r, "split": "dev"} for r in rows]
        elif case == "missing mask":
            rows = [{**r, "mask_path": ""} for r in rows]
            task_type = "segmentation"
        elif case == "empty subject":
            rows[1]["subject"] = " "
        elif case == "unknown class":
            task_type = "classification"
        path = write_csv(tmp_path, rows)
    changes = {"class_names": ("0", "1", "2")} if case == "unknown class" else {}
    with pytest.raises(ProbeInputError, match=pattern):
        read_task(task_config(path, task_type, **changes))
