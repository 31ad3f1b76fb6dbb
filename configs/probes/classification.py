"""Classification from a task CSV (disease: ADNI CN/MCI/AD, OASIS, ABIDE; sequence type; IDH).

CSV columns: path, subject, label[, split]. Argument: the CSV path.

    braindino-probe --config configs/probes/classification.py:adni.csv \
        --config.encoders='("workdir:runs/braindino", "dinov3:dinov3_vitb16.pth", "random:like=workdir:runs/braindino")'
"""

from braindino_jax.probes.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.name = "classification"
    c.output_dir = "probe_out/classification"
    c.task.name = "classification"
    c.task.type = "classification"
    c.task.csv = arg or "task.csv"
    c.heads = ("linear", "mlp")
    c.train.learning_rates = (1e-3, 1e-2)
    c.protocol.label_fractions = (0.1, 0.25, 0.5, 1.0)
    c.protocol.seeds = (0, 1, 2)
    return c
