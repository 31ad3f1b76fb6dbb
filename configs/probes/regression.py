"""Regression from a task CSV (brain age: MAE in years; days after stroke: add log1p).

CSV columns: path, subject, label (a number)[, split]. Argument: the CSV path.

    braindino-probe --config configs/probes/regression.py:brain_age.csv --config.encoders='("export:braindino_vitb16",)'
    braindino-probe --config configs/probes/regression.py:atlas.csv --config.task.log1p=True
"""

from braindino_jax.probes.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.name = "regression"
    c.output_dir = "probe_out/regression"
    c.task.name = "regression"
    c.task.type = "regression"
    c.task.csv = arg or "task.csv"
    c.heads = ("linear", "mlp")
    c.train.learning_rates = (1e-3, 1e-2)
    c.protocol.label_fractions = (0.1, 0.25, 0.5, 1.0)
    c.protocol.seeds = (0, 1, 2)
    return c
