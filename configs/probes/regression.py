"""Regression from a task CSV (brain age: MAE in years; days after stroke: add log1p).

CSV columns: path, subject, label (a number)[, split]. Argument: the CSV path.

    braindino-probe --config configs/probes/regression.py:brain_age.csv --config.encoders='("export:braindino_vitb16",)'
    braindino-probe --config configs/probes/regression.py:atlas.csv --config.task.log1p=True
"""

from braindino_jax.probes.config import csv_task_config


def get_config(arg: str | None = None):
    return csv_task_config("regression", "regression", arg, heads=("linear", "mlp"))
