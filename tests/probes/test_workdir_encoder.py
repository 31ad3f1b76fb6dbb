"""``workdir:PATH[@STEP]`` end to end: a real (tiny) training run's Orbax checkpoints, read as
the probes' frozen encoder, the latest step or a chosen one, and featurising a phantom volume."""

import jax
import numpy as np
import pytest
from flax import nnx

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.probes.encoders import architecture, fingerprint, load_encoder
from braindino_jax.probes.errors import ProbeConfigError
from braindino_jax.probes.features import ExtractionSettings, VolumeJob, extract_features
from braindino_jax.train.checkpoint import load_teacher
from braindino_jax.train.loop import train
from tests.train.conftest import tiny_config
from tests.train.test_run import shards  # noqa: F401  (fixture: 64 disc slices in ArrayRecord shards)

STEPS = 2


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):  # noqa: F811
    """Two training steps of the train tests' tiny config, a checkpoint after each."""
    config = tiny_config()
    config.data.shards = (shards,)
    config.train.update(dict(epochs=1.0, epoch_length=STEPS, log_every=1))
    config.checkpoint.update(dict(every=1, keep=10))
    workdir = tmp_path_factory.mktemp("run")
    assert train(config, str(workdir), progress=False).final_step == STEPS
    return workdir


def params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_workdir_spec_is_the_checkpoint_teacher_latest_or_at_a_step(run_dir, phantom_csv):
    latest = load_encoder(f"workdir:{run_dir}")
    first = load_encoder(f"workdir:{run_dir}@1")
    teacher, _ = load_teacher(str(run_dir), 1)
    jax.tree.map(np.testing.assert_array_equal, params(first.model), params(teacher))
    assert first.fingerprint == fingerprint(teacher)
    # The latest step: the run's own export of its final teacher (an Orbax Flax folder).
    exported = load_encoder(f"export:{run_dir / 'export'}")
    jax.tree.map(np.testing.assert_array_equal, params(latest.model), params(exported.model))
    assert latest.fingerprint == exported.fingerprint != first.fingerprint  # the EMA teacher moved in step 2
    assert architecture(load_encoder(f"random:like=workdir:{run_dir}").config) == architecture(latest.config)

    volume = str(phantom_csv.parent / "images" / "sub-001_T1w.nii.gz")
    settings = ExtractionSettings(PrepConfig(target_spacing=(3.0, 3.0, 3.0), n_slices=4, size=32), 32, batch_size=8)
    cls = [extract_features(e, [VolumeJob(volume)], settings).features[VolumeJob(volume)]["cls"]
           for e in (latest, first)]
    assert cls[0].shape == (4, latest.config.embed_dim) and np.all(np.isfinite(cls[0]))
    assert not np.array_equal(cls[0], cls[1])


def test_workdir_spec_errors_name_the_run_and_the_saved_steps(run_dir, tmp_path):
    with pytest.raises(ProbeConfigError, match=r"workdir:.*no checkpoint at step 7; saved steps: \[1, 2\]"):
        load_encoder(f"workdir:{run_dir}@7")
    with pytest.raises(ProbeConfigError, match=r"workdir:.*not a training work directory"):
        load_encoder(f"workdir:{tmp_path}")
