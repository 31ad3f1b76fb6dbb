"""A tiny BrainDINO for CPUs: 1500 steps on the demo shards in about 8 minutes on 2 cores.

Same objective, schedules and pipeline as the full recipe; sizes shrink (a 4-block, 192-wide
ViT with 16-px patches, 1024-prototype heads, 96-px global and 2 x 48-px local crops, 15
"epochs" of 100 steps), and five settings change because the run is 1500 steps, not 100 000s:

- LayerScale starts at 0.1 (CaiT's value for nets up to 18 blocks), not 1e-5: with silent
  blocks every image has the same CLS token, the teacher's targets are uniform, and the
  student learns to output uniform too before its blocks wake up.
- Teacher temperature 0.01 throughout (DINOv3: 0.04 -> 0.07): the student's logits are
  pushed towards student_temp / teacher_temp = 10x the teacher's deviations, so the escape
  from uniform targets takes tens of steps, not thousands.
- Teacher momentum 0.95 -> 0.99 (DINOv3: 0.992 -> 1): an EMA with a 125-step memory would
  hold the teacher near its random init for the first quarter of the run.
- Learning rate 4e-3 before scaling (2e-3 at batch 16; DINOv3's 1e-3 gives 5e-4).
- Global crops cover 50-100% of the slice and local crops 20-50%: a phantom slice has little
  texture, so smaller crops of one slice share too little to be predicted from each other.

    braindino-train --config configs/debug_cpu.py --workdir runs/debug
"""

from braindino_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.arch = "vit_small"
    c.model.vit.update(dict(embed_dim=192, depth=4, num_heads=3, patch_size=16,
                            dtype="float32", drop_path_rate=0.0, layerscale_init=0.1))
    for head in (c.model.dino_head, c.model.ibot_head):
        head.update(dict(out_dim=1024, hidden_dim=256, bottleneck_dim=64))
    c.data.shards = ("demo_out/slices-*.array_record",)
    c.augment.update(dict(global_size=96, local_size=48, n_local=2, global_scale=(0.5, 1.0),
                          local_scale=(0.2, 0.5)))
    c.train.update(dict(batch_size=16, epochs=15, epoch_length=100, log_every=10))
    c.checkpoint.every = 500
    c.optim.update(dict(lr=4e-3, warmup_epochs=0.3, freeze_last_layer_epochs=0.1))
    c.teacher.update(dict(temp=0.01, warmup_temp=0.01, momentum=0.95, final_momentum=0.99))
    if arg:  # e.g. "steps=50": a shorter run for smoke tests
        key, _, value = arg.partition("=")
        if key != "steps":
            raise ValueError(f"debug_cpu: unknown argument {arg!r} (expected steps=N)")
        c.train.epochs = int(value) / c.train.epoch_length
    return c
