"""Segmentation (e.g. BraTS) from a task CSV: decoders on frozen patch features of 4 blocks.

CSV columns: path, subject, mask_path (a label map on the image's voxel grid)[, split]. Several
co-registered sequences (one column each, e.g. --config.task.image_columns='("t1", "t1c", "t2",
"flair")') are fused per patch, averaged or with --config.features.modalities=concat.
Argument: the CSV path. Set the label values (background first) and their names, e.g. BraTS
2021: --config.task.label_values='(0, 1, 2, 4)' --config.task.class_names='("background",
"necrosis", "edema", "enhancing")'; unset, the values found in the masks are used.

    braindino-probe --config configs/probes/segmentation.py:brats.csv --config.encoders='("export:braindino_vitb16",)'
"""

from braindino_jax.probes.config import csv_task_config


def get_config(arg: str | None = None):
    c = csv_task_config("segmentation", "segmentation", arg, heads=("linear", "transposed_conv"),
                        label_fractions=(0.1, 0.5, 1.0))
    c.segmentation.layers = (2, 5, 8, 11)  # ViT-B/16; blocks of a deeper or shallower encoder differ
    return c
