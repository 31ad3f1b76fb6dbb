"""kNN (cosine, k in 1, 3, 5, 10, 20, 50; k chosen on val) on frozen volume features.

CSV columns: path, subject, label[, split]. Argument: the CSV path. For a regression target
add --config.task.type=regression.

    braindino-probe --config configs/probes/knn.py:adni.csv
"""

from braindino_jax.probes.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.name = "knn"
    c.output_dir = "probe_out/knn"
    c.task.name = "knn"
    c.task.type = "classification"
    c.task.csv = arg or "task.csv"
    c.heads = ("knn",)
    c.protocol.label_fractions = (0.1, 0.25, 0.5, 1.0)
    c.protocol.seeds = (0, 1, 2)
    return c
