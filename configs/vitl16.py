"""ViT-L/16 under the same recipe as braindino_vitb16 (DINOv3's vitl16 settings).

Drop path 0.3 as DINOv3's ViT-L; activations rematerialised and blocks scanned to fit memory
and compile once per block. Shard the weights over more devices with --config.mesh.fsdp=N.
"""

from braindino_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.arch = "vit_large"
    c.model.vit.update(dict(drop_path_rate=0.3, remat=True, scan_blocks=True))
    c.data.shards = ("shards/slices-*.array_record",)
    c.data.num_workers = 8
    c.train.batch_size = 1024
    c.train.epochs = 100
    return c
