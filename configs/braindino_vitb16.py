"""BrainDINO's recipe: DINOv3-style ViT-B/16 pretraining on axial brain-MRI slices.

ViT-B/16 with 4 registers, no qkv bias, LayerNorm eps 1e-6, LayerScale 1e-5, drop path 0.1;
separate DINO and iBOT heads (3-layer MLP, 2048 hidden, 256 bottleneck, 65536 prototypes);
Sinkhorn-Knopp centering; 2 x 224 px global + 8 x 96 px local crops; AdamW with the DESIGN
schedules (lr 1e-3 x 4 sqrt(B/1024), 10 warm-up epochs, cosine to 1e-6; weight decay 0.04 -> 0.4;
teacher momentum 0.992 -> 1; teacher temperature 0.04 -> 0.07 over 30 epochs), layer-wise lr
decay 0.9, patch-embed lr x 0.2, gradient clip 3.0 per submodule, last layer frozen for the first
epoch, 1250-step epochs. bf16 matmuls (cuDNN attention on GPU, chosen automatically).

    braindino-train --config configs/braindino_vitb16.py --workdir gs://BUCKET/runs/vitb16 \
        --config.data.shards="('gs://BUCKET/shards/slices-*.array_record',)"
"""

from braindino_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.arch = "vit_base"
    c.model.vit.drop_path_rate = 0.1
    c.data.shards = ("shards/slices-*.array_record",)
    c.data.num_workers = 8
    c.train.batch_size = 1024
    c.train.epochs = 100
    return c
