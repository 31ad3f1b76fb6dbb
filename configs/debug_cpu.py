"""A tiny BrainDINO for CPUs: a few hundred steps on the demo shards in minutes on 2 cores.

Same objective, schedules and pipeline as the full recipe; only sizes shrink: a 4-block,
192-wide ViT with 16-px patches, 1024-prototype heads, 96-px global and 48-px local crops, and
"epochs" of 100 steps.

    braindino-train --config configs/debug_cpu.py --workdir runs/debug
"""

from braindino_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.arch = "vit_small"
    c.model.vit.update(dict(embed_dim=192, depth=4, num_heads=3, patch_size=16,
                            dtype="float32", drop_path_rate=0.0))
    for head in (c.model.dino_head, c.model.ibot_head):
        head.update(dict(out_dim=1024, hidden_dim=256, bottleneck_dim=64))
    c.data.shards = ("demo_out/slices-*.array_record",)
    c.augment.update(dict(global_size=96, local_size=48, n_local=4))
    c.train.update(dict(batch_size=16, epochs=3, epoch_length=100, log_every=10))
    c.optim.update(dict(warmup_epochs=0.3, freeze_last_layer_epochs=0.1))
    c.teacher.warmup_temp_epochs = 1
    if arg:  # e.g. "steps=50": a shorter run for smoke tests
        key, _, value = arg.partition("=")
        if key != "steps":
            raise ValueError(f"debug_cpu: unknown argument {arg!r} (expected steps=N)")
        c.train.epochs = int(value) / c.train.epoch_length
    return c
