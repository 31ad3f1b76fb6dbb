"""Survival (e.g. UPENN-GBM) from a task CSV: Cox heads, C-index, log-rank and Kaplan-Meier.

CSV columns: path (or one column per modality), subject, time, event (1 = observed,
0 = censored)[, split]. Argument: the CSV path.

    braindino-probe --config configs/probes/survival.py:upenn_gbm.csv \
        --config.task.image_columns='("t1c", "flair")' --config.features.modalities=concat
"""

from braindino_jax.probes.config import csv_task_config


def get_config(arg: str | None = None):
    c = csv_task_config("survival", "survival", arg, heads=("linear", "mlp"), label_fractions=(0.25, 0.5, 1.0))
    c.train.weight_decays = (1e-3, 1e-1)
    return c
