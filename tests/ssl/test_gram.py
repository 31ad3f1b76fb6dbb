"""Gram anchoring loss against Meta's GramLoss (fixture) and a float64 reference, and its gradient."""

import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from braindino_jax.ssl.gram import NEGATIVES, gram_loss

# Meta's dinov3/loss/gram_loss.py run on fixed inputs (tools/make_dinov3_gram_fixture.py).
DINOV3_GRAM = Path(__file__).parents[1] / "fixtures" / "dinov3_gram.npz"


def reference_gram_loss(student, teacher, image_level, negatives):
    def grams(x):
        x = x.astype(np.float64)
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        if not image_level:
            x = x.reshape(1, -1, x.shape[-1])
        return np.einsum("bnd,bmd->bnm", x, x)

    gs, gt = grams(student), grams(teacher)
    if negatives == "remove":
        gs, gt = np.maximum(gs, 0), np.maximum(gt, 0)
    elif negatives == "remove_teacher":
        gt = np.maximum(gt, 0)
    return np.mean((gs - gt) ** 2)


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(4, 9, 8)).astype(np.float32)
    teacher = (student + 0.7 * rng.normal(size=student.shape)).astype(np.float32)
    return student, teacher


@pytest.mark.parametrize("image_level", [True, False])
@pytest.mark.parametrize("negatives", ["keep", "remove", "remove_teacher"])
def test_matches_float64_reference(patches, image_level, negatives):
    student, teacher = patches
    got = gram_loss(student, teacher, image_level=image_level, negatives=negatives)
    want = reference_gram_loss(student, teacher, image_level, negatives)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("level", ["image", "batch"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_matches_dinov3_gram_loss(negatives, level):
    """Loss and student gradient equal Meta's GramLoss on the same inputs, in every mode."""
    reference = np.load(DINOV3_GRAM)
    student, teacher = reference["student"], reference["teacher"]
    fn = lambda s: gram_loss(s, teacher, image_level=level == "image", negatives=negatives)  # noqa: E731
    loss, grad = jax.value_and_grad(fn)(student)
    np.testing.assert_allclose(float(loss), float(reference[f"{negatives}/{level}/loss"]),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), reference[f"{negatives}/{level}/grad"],
                               rtol=1e-4, atol=1e-7)


def test_negatives_are_kept_by_default_as_in_every_dinov3_config():
    assert inspect.signature(gram_loss).parameters["negatives"].default == "keep"
    reference = np.load(DINOV3_GRAM)
    student, teacher = reference["student"], reference["teacher"]
    np.testing.assert_allclose(float(gram_loss(student, teacher)),
                               float(reference["keep/image/loss"]), rtol=1e-5)


def test_zero_for_identical_features_and_scale_invariant(patches):
    student, _ = patches
    assert float(gram_loss(student, 2.5 * student)) < 1e-12


def test_only_student_receives_gradient(patches):
    student, teacher = patches
    grad_s, grad_t = jax.grad(gram_loss, argnums=(0, 1))(student, teacher)
    assert np.any(np.asarray(grad_s) != 0)
    assert np.all(np.asarray(grad_t) == 0)


def test_batch_level_sharded_equals_single_device(patches, batch_sharding):
    student, teacher = patches
    fn = jax.jit(lambda s, t: gram_loss(s, t, image_level=False))
    sharded = fn(*jax.device_put((np.tile(student, (2, 1, 1)), np.tile(teacher, (2, 1, 1))),
                                 batch_sharding(3, 0)))
    single = fn(np.tile(student, (2, 1, 1)), np.tile(teacher, (2, 1, 1)))
    np.testing.assert_allclose(float(sharded), float(single), rtol=1e-6)


def test_batch_level_groups_keep_per_device_semantics(patches, batch_sharding):
    """group_size = B / 8: each device's images form one Gram matrix, as DINOv3 per GPU."""
    student, teacher = (np.tile(x, (4, 1, 1)) for x in patches)  # 16 images, 2 per device
    sharding = batch_sharding(3, 0)
    s, t = jax.device_put(student, sharding), jax.device_put(teacher, sharding)
    fn = jax.jit(lambda s, t: gram_loss(s, t, image_level=False, group_size=2))
    got = fn(s, t)
    assert "all-gather" not in fn.lower(s, t).compile().as_text()
    per_device = [reference_gram_loss(np.asarray(a.data), np.asarray(b.data), False, "keep")
                  for a, b in zip(s.addressable_shards, t.addressable_shards)]
    np.testing.assert_allclose(float(got), np.mean(per_device), rtol=1e-5)
    whole = reference_gram_loss(student, teacher, False, "keep")
    assert abs(float(got) - whole) > 1e-3  # the global-batch Gram is a different loss
    with pytest.raises(ValueError, match="group_size"):
        gram_loss(student, teacher, image_level=False, group_size=3)


@pytest.mark.parametrize("negatives", ["keep", "remove"])
def test_gradient_matches_finite_differences(x64, negatives):
    rng = np.random.default_rng(1)
    student = jnp.asarray(rng.normal(size=(2, 4, 3)))
    teacher = jnp.asarray(rng.normal(size=(2, 4, 3)))
    check_grads(lambda s: gram_loss(s, teacher, negatives=negatives), (student,), order=1,
                modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_bf16_input_is_finite(patches):
    student, teacher = patches
    loss = gram_loss(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_bad_inputs_are_named(patches):
    student, teacher = patches
    with pytest.raises(ValueError, match="negatives"):
        gram_loss(student, teacher, negatives="drop")
    with pytest.raises(ValueError, match="teacher_patches"):
        gram_loss(student, teacher[:, :4])
