"""Tiny training configs and synthetic batches for the train-step tests."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from braindino_jax.data import masking
from braindino_jax.train.config import build_spec, default_config

IMAGE = 48


def tiny_config(**sections):
    """A seconds-to-compile config: 2-block 32-wide ViT, 8-px patches, 32/16-px crops."""
    c = default_config()
    c.model.arch = "vit_small"
    c.model.vit.update(dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, dtype="float32",
                            drop_path_rate=0.1, n_storage_tokens=2,
                            # Active blocks: at 1e-5 every CLS is the same vector, and KoLeo of
                            # near-duplicates is too ill-conditioned to compare layouts.
                            layerscale_init=0.1))
    for head in (c.model.dino_head, c.model.ibot_head):
        head.update(dict(out_dim=64, hidden_dim=32, bottleneck_dim=16))
    c.data.shards = ("unused-*.array_record",)
    c.data.image_size = IMAGE
    c.augment.update(dict(global_size=32, local_size=16, n_local=2))
    c.train.update(dict(batch_size=16, epochs=1.0, epoch_length=20))
    c.optim.update(dict(warmup_epochs=0.1, freeze_last_layer_epochs=0.1))
    c.teacher.warmup_temp_epochs = 0.5
    c.train.max_consecutive_skips = 2
    for section, values in sections.items():
        c[section].update(values)
    return c


def tiny_spec(device_count=8, **sections):
    return build_spec(tiny_config(**sections), device_count=device_count, process_count=1,
                      check_data=False)


def mesh_of(n_devices: int, fsdp: int = 1) -> Mesh:
    devices = np.array(jax.devices()[:n_devices]).reshape(n_devices // fsdp, fsdp)
    return Mesh(devices, ("data", "fsdp"))


def synthetic_batch(spec, seed: int) -> dict[str, np.ndarray]:
    """Disc 'brains' of random size and brightness, masks stratified per group like the pipeline."""
    rng = np.random.default_rng(seed)
    b, size = spec.batch_size, spec.pipeline.image_size
    yy, xx = np.mgrid[:size, :size] - size / 2
    pixels = np.zeros((b, size, size), np.uint8)
    for i in range(b):
        radius = rng.uniform(0.25, 0.45) * size
        inside = yy**2 + xx**2 < radius**2
        texture = rng.integers(40, 255, (size, size))
        pixels[i][inside] = texture[inside]
    fg = pixels > 0
    fg_mean = np.array([p[m].mean() for p, m in zip(pixels, fg)], np.float32)
    fg_std = np.array([p[m].std() for p, m in zip(pixels, fg)], np.float32)
    p = spec.pipeline
    groups = [masking.sample_masks(rng, 2 * spec.group_batch, spec.mask_grid,
                                   p.mask_sample_probability, p.mask_ratio_range)
              for _ in range(spec.groups)]
    masks = np.concatenate(groups).reshape(b, 2, -1)
    return {"pixels": pixels, "fg_mean": fg_mean, "fg_std": fg_std, "masks": masks}


def put(setup, batch):
    return jax.device_put(batch, setup.batch_sharding)


@pytest.fixture(scope="session")
def tiny():
    return tiny_spec()


@functools.lru_cache(maxsize=None)
def built(n_devices: int, fsdp: int = 1):
    """The tiny spec's TrainSetup on a mesh, built (and its step compiled) once per session."""
    from braindino_jax.train import setup as train_setup

    return train_setup.build(tiny_spec(), mesh_of(n_devices, fsdp))
