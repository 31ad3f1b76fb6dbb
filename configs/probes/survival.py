"""Survival (e.g. UPENN-GBM) from a task CSV: Cox heads, C-index, log-rank and Kaplan-Meier.

CSV columns: path (or one column per modality), subject, time, event (1 = observed,
0 = censored)[, split]. Argument: the CSV path.

    braindino-probe --config configs/probes/survival.py:upenn_gbm.csv \
        --config.task.image_columns='("t1c", "flair")' --config.features.modalities=concat
"""

from braindino_jax.probes.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.name = "survival"
    c.output_dir = "probe_out/survival"
    c.task.name = "survival"
    c.task.type = "survival"
    c.task.csv = arg or "task.csv"
    c.heads = ("linear", "mlp")
    c.train.learning_rates = (1e-3, 1e-2)
    c.train.weight_decays = (1e-3, 1e-1)
    c.protocol.label_fractions = (0.25, 0.5, 1.0)
    c.protocol.seeds = (0, 1, 2)
    return c
