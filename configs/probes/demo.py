"""The probe demo on built-in phantoms: runs on a laptop CPU with no external data.

Argument: TASK[,RUN] with TASK one of classification (lesion present/absent, the default),
regression (lesion volume, log1p), survival (synthetic, shortening with lesion volume) or
segmentation (CSF / grey matter / white matter / lesion); RUN, a training work directory, adds
its teacher and random inits of the same architecture. Without RUN, a tiny random ViT (and its
LayerScale-1 control) stands in. Small on purpose: 48 subjects (12 in the test split), 16 slices of 96 px.

    braindino-probe --config configs/probes/demo.py
    braindino-probe --config configs/probes/demo.py:segmentation,runs/debug
"""

from braindino_jax.probes.config import default_config

TINY_VIT = "vit_small(embed_dim=192,depth=4,num_heads=3)"  # the training debug config's size
TASKS = ("classification", "regression", "survival", "segmentation")


def get_config(arg: str | None = None):
    task, _, run = (arg or "classification").partition(",")
    if task not in TASKS:
        raise ValueError(f"configs/probes/demo.py: task {task!r} is not one of {TASKS}")
    c = default_config()
    c.name = f"demo-{task}"
    c.output_dir = f"probe_demo/{task}"
    c.task.name = f"phantom-{task}"
    c.task.type = task
    c.task.phantoms = 48
    c.task.image_columns = ("t1", "flair")
    c.task.label_column = {"classification": "lesion", "regression": "lesion_ml"}.get(task, "label")
    c.task.log1p = task == "regression"
    if run:
        like = f"workdir:{run}"
        c.encoders = (like, f"random:like={like}", f"random-active:like={like}")
    else:
        c.encoders = (f"random:{TINY_VIT}", f"random-active:{TINY_VIT}")
    c.input.target_spacing = (2.0, 2.0, 2.0)
    c.input.n_slices = 16
    c.input.size = 96
    c.input.image_size = 96
    c.extract.batch_size = 64
    c.extract.workers = 1
    c.features.modalities = "concat"
    c.heads = ("linear", "mlp", "knn") if task in ("classification", "regression") else ("linear", "mlp")
    c.train.learning_rates = (1e-2,)
    c.train.epochs = 150
    c.train.patience = 30
    c.knn.ks = (1, 3, 5)
    c.protocol.label_fractions = (0.5, 1.0)
    c.protocol.seeds = (0, 1)
    c.protocol.val_fraction = 0.25
    c.protocol.test_fraction = 0.25
    c.protocol.bootstrap = 200
    c.visualize.n_volumes = 2
    c.visualize.n_slices = 3
    if task == "segmentation":
        c.heads = ("linear", "transposed_conv")
        # T1w and FLAIR fused per patch (the lesions are FLAIR-bright), from every block of the
        # 4-block debug encoder: 4 spread blocks, as (2, 5, 8, 11) are of a 12-block one.
        c.segmentation.layers = (0, 1, 2, 3)
        # 150 steps at 1e-3 left the decoders underfitted (the transposed-conv decoder scored
        # below the linear one, and no encoder's lesion Dice left 0): 1000 at 3e-3 converge.
        c.segmentation.steps = 1000
        c.segmentation.eval_every = 100
        c.segmentation.learning_rate = 3e-3
        c.segmentation.batch_size = 8
        c.segmentation.channels = 32
        c.protocol.seeds = (0,)
    return c
