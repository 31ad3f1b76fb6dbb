"""Shared probe fixtures: one tiny ViT, one small phantom task, one feature cache per session.

The end-to-end tests share the phantom task and the cache, so each volume is featurised once
per encoder for the whole session (the cache itself is tested separately).
"""

import pytest

from braindino_jax.probes.config import default_config
from braindino_jax.probes.phantom_tasks import write_phantom_task

TINY = "vit_small(embed_dim=64,depth=2,num_heads=2)"
TINY_SPEC = f"random:{TINY}"


@pytest.fixture(scope="session")
def phantom_csv(tmp_path_factory):
    """12 phantom subjects (T1w + FLAIR, labels, survival) at 3 mm."""
    return write_phantom_task(tmp_path_factory.mktemp("phantoms") / "task", n_subjects=12, spacing=3.0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("feature_cache"))


@pytest.fixture(scope="session")
def tiny_arch():
    return TINY


@pytest.fixture(scope="session")
def small_config():
    return _small_config


def _small_config(out_dir, csv, cache_dir, task_type="classification", **task):
    """A probe config sized for tests: 8 slices of 64 px, 3 mm, short training."""
    c = default_config()
    c.name = f"test-{task_type}"
    c.output_dir = str(out_dir)
    c.encoders = (TINY_SPEC,)
    c.task.name = f"phantom-{task_type}"
    c.task.type = task_type
    c.task.csv = str(csv)
    c.task.image_columns = ("t1",)
    c.task.label_column = "lesion"
    for key, value in task.items():
        c.task[key] = value
    c.input.target_spacing = (3.0, 3.0, 3.0)
    c.input.n_slices = 8
    c.input.size = 64
    c.input.image_size = 64
    c.extract.batch_size = 32
    c.extract.workers = 0
    c.extract.progress = False
    c.extract.cache_dir = cache_dir
    c.heads = ("linear",)
    c.train.learning_rates = (1e-2,)
    c.train.epochs = 40
    c.train.patience = 10
    c.knn.ks = (1, 3)
    c.protocol.val_fraction = 0.25
    c.protocol.test_fraction = 0.25
    c.protocol.bootstrap = 50
    c.visualize.enabled = False
    return c
