"""kNN (cosine, k in 1, 3, 5, 10, 20, 50; k chosen on val) on frozen volume features.

CSV columns: path, subject, label[, split]. Argument: the CSV path. For a regression target
add --config.task.type=regression.

    braindino-probe --config configs/probes/knn.py:adni.csv
"""

from braindino_jax.probes.config import csv_task_config


def get_config(arg: str | None = None):
    return csv_task_config("knn", "classification", arg, heads=("knn",))
