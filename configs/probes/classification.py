"""Classification from a task CSV (disease: ADNI CN/MCI/AD, OASIS, ABIDE; sequence type; IDH).

CSV columns: path, subject, label[, split]. Argument: the CSV path.

    braindino-probe --config configs/probes/classification.py:adni.csv \
        --config.encoders='("workdir:runs/braindino", "dinov3:dinov3_vitb16.pth", "random:like=workdir:runs/braindino")'
"""

from braindino_jax.probes.config import csv_task_config


def get_config(arg: str | None = None):
    return csv_task_config("classification", "classification", arg, heads=("linear", "mlp"))
