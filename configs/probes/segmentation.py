"""Segmentation (e.g. BraTS) from a task CSV: decoders on frozen patch features of 4 blocks.

CSV columns: path, subject, mask_path (a label map on the image's voxel grid)[, split].
Argument: the CSV path. Set the label values (background first) and their names, e.g. BraTS
2021: --config.task.label_values='(0, 1, 2, 4)' --config.task.class_names='("background",
"necrosis", "edema", "enhancing")'; unset, the values found in the masks are used.

    braindino-probe --config configs/probes/segmentation.py:brats.csv --config.encoders='("export:braindino_vitb16",)'
"""

from braindino_jax.probes.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.name = "segmentation"
    c.output_dir = "probe_out/segmentation"
    c.task.name = "segmentation"
    c.task.type = "segmentation"
    c.task.csv = arg or "task.csv"
    c.heads = ("linear", "transposed_conv")
    c.segmentation.layers = (2, 5, 8, 11)  # ViT-B/16; blocks of a deeper or shallower encoder differ
    c.protocol.label_fractions = (0.1, 0.5, 1.0)
    c.protocol.seeds = (0, 1, 2)
    return c
