"""Starting from existing weights (model.init_from) and stage 2's Gram teacher."""

import jax
import numpy as np
import pytest
from flax import nnx

from braindino_jax.models.convert import export_backbone, save_flax_checkpoint
from braindino_jax.models.vit import VisionTransformer
from braindino_jax.train import setup as train_setup
from braindino_jax.train.pretrained import InitError

from .conftest import built, mesh_of, put, synthetic_batch, tiny_spec


def _backbone(spec, seed=7, **changes):
    return VisionTransformer(spec.vit.replace(**changes), rngs=nnx.Rngs(seed))


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_dinov3_safetensors_sets_student_and_teacher(tiny, tmp_path):
    source = _backbone(tiny)
    path = tmp_path / "dinov3.safetensors"
    export_backbone(source, path)  # Meta's DINOv3 key layout
    spec = tiny_spec(model={"init_from": str(path)})
    setup = train_setup.build(spec, built(8).mesh)
    state = train_setup.init_state(setup)
    wanted = nnx.state(source, nnx.Param)
    _same(state.student["backbone"], wanted)
    _same(state.teacher["backbone"], wanted)
    fresh = train_setup.init_state(built(8))
    _same(state.student["dino_head"], fresh.student["dino_head"])  # no heads in the file


def test_init_from_other_architecture_names_the_field(tiny, tmp_path):
    folder = tmp_path / "wide"
    save_flax_checkpoint(folder, _backbone(tiny, embed_dim=64, num_heads=4))
    spec = tiny_spec(model={"init_from": str(folder)})
    with pytest.raises(InitError, match=r"config\.model\.init_from: .*embed_dim: 64 in the weights, 32"):
        train_setup.init_state(train_setup.build(spec, built(8).mesh))
    with pytest.raises(InitError, match="does not exist"):
        train_setup.init_state(train_setup.build(
            tiny_spec(model={"init_from": str(tmp_path / "missing.pth")}), built(8).mesh))


def test_stage2_gram_anchoring_step(tiny, tmp_path):
    """Gram teacher loaded from a backbone folder, frozen; the Gram loss enters the total."""
    folder = tmp_path / "stage1"
    gram_source = _backbone(tiny, seed=3)
    save_flax_checkpoint(folder, gram_source)
    spec = tiny_spec(gram={"enabled": True, "teacher": str(folder), "weight": 1.5})
    setup = train_setup.build(spec, mesh_of(8))
    state = train_setup.init_state(setup)
    _same(state.gram_teacher, nnx.state(gram_source, nnx.Param))
    before = jax.device_get(state.gram_teacher)
    state, metrics = setup.step(state, put(setup, synthetic_batch(spec, 0)))
    assert np.isfinite(float(metrics["gram_loss"])) and float(metrics["gram_loss"]) > 0
    parts = (float(metrics["dino_loss"]) + float(metrics["ibot_loss"])
             + 0.1 * 2 * float(metrics["koleo_loss"]) + 1.5 * float(metrics["gram_loss"]))
    assert float(metrics["loss"]) == pytest.approx(parts, rel=1e-5)
    _same(before, state.gram_teacher)
