"""Stage 2: DINOv3-style high-resolution adaptation with Gram anchoring, from a stage-1 run.

Student and teacher start from the stage-1 teacher (backbone and heads); a frozen copy of that
teacher's backbone is the Gram teacher, whose patch-similarity (Gram) matrices the student keeps
(DINOv3's high-res adaptation: image-level Gram, negatives kept, weight 1.5). Crops grow to
448 px global and 112 px local, with a small constant learning rate, momentum 0.999 and a fixed
teacher temperature of 0.07 for 10 epochs (DINOv3's ``dinov3_vit7b16_high_res_adapt``).
Slices stored at 256 px are upsampled; prepare shards with ``--size 512`` for native detail.

    braindino-train --config configs/stage2_highres.py:runs/vitb16 --workdir runs/vitb16_stage2

The argument is the stage-1 work directory (or a backbone export); the base is ViT-B/16.
"""

from braindino_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.arch = "vit_base"
    c.model.vit.update(dict(drop_path_rate=0.1, remat=True))
    c.model.init_from = arg or ""
    c.gram.update(dict(enabled=True, teacher=arg or "", weight=1.5, image_level=True,
                       negatives="keep"))
    c.data.shards = ("shards/slices-*.array_record",)
    c.data.num_workers = 8
    c.augment.update(dict(global_size=448, local_size=112))
    c.train.batch_size = 256
    c.train.epochs = 10
    c.optim.update(dict(lr=1.25e-5, min_lr=1.25e-5, scaling_rule="none", warmup_epochs=0,
                        weight_decay=0.04, weight_decay_end=0.04, freeze_last_layer_epochs=0))
    c.teacher.update(dict(momentum=0.999, final_momentum=0.999, temp=0.07, warmup_temp=0.07,
                          warmup_temp_epochs=0))
    return c
