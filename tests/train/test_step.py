"""The jitted train step: sharding equivalence, FSDP layout, HLO traffic, NaN guard, EMA."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braindino_jax.train import setup as train_setup
from braindino_jax.train.sharding import make_mesh
from braindino_jax.train.step import nonfinite_terms

from .conftest import built, put, synthetic_batch, tiny_spec


def _run(setup, steps=3):
    spec = setup.spec
    state = train_setup.init_state(setup)
    losses = []
    for i in range(steps):
        state, metrics = setup.step(state, put(setup, synthetic_batch(spec, i)))
        losses.append({k: float(v) for k, v in metrics.items() if k.endswith("loss")})
    return losses, jax.device_get(state)


def test_same_losses_and_parameters_on_1_device_and_on_8_device_meshes(tiny):
    """One global batch, one seed: 1x1, 8x1 and 2x4 meshes agree over 3 steps (float32)."""
    reference, ref_state = _run(built(1))
    for n, fsdp in ((8, 1), (8, 4)):
        losses, state = _run(built(n, fsdp))
        for ref, got in zip(reference, losses):
            for key in ref:
                assert got[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-6), (n, fsdp, key)
        for a, b in zip(jax.tree.leaves(ref_state.student), jax.tree.leaves(state.student)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
        for a, b in zip(jax.tree.leaves(ref_state.teacher), jax.tree.leaves(state.teacher)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    assert reference[-1]["loss"] != reference[0]["loss"]


@functools.lru_cache(maxsize=None)
def _fsdp_setup():
    """Large enough that the head and block matrices pass the sharding size threshold."""
    spec = tiny_spec(model={"vit": dict(embed_dim=128, depth=2, num_heads=4),
                            "dino_head": dict(out_dim=2048, hidden_dim=256, bottleneck_dim=64),
                            "ibot_head": dict(out_dim=2048, hidden_dim=256, bottleneck_dim=64)},
                     mesh={"data": 1, "fsdp": 8})
    return train_setup.build(spec, make_mesh(1, 8))


def test_fsdp_shards_parameters_and_optimizer_state():
    """With fsdp=8 each device holds at most 1/6 of the replicated parameter/optimizer bytes."""
    setup = _fsdp_setup()
    state = train_setup.init_state(setup)
    device = jax.devices()[0]

    def device_bytes(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                   for s in leaf.addressable_shards if s.device == device)

    def full_bytes(tree):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

    for part in (state.student, state.teacher, state.opt_state):
        assert device_bytes(part) <= full_bytes(part) / 6, (device_bytes(part), full_bytes(part))
    kernel = state.student["dino_head"]["last_layer"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def _collectives(setup) -> list[tuple[str, int]]:
    compiled = setup.step.lower(setup.state_spec(), setup.batch_spec()).compile()
    found = []
    for line in compiled.as_text().splitlines():
        match = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-to-all|collective-permute)\(",
                          line)
        if match:
            dims = [int(d) for d in match.group(2).split(",") if d]
            found.append((match.group(3), int(np.prod(dims)) if dims else 1))
    return found


def test_data_parallel_step_moves_no_activations_between_devices(tiny):
    """On an 8x1 mesh the compiled step only all-reduces: no all-gather, all-to-all or
    permute of crops, tokens or logits (teacher centering, iBOT gather, KoLeo stay local)."""
    assert _collectives(built(8)) == []


def test_fsdp_step_gathers_only_weights():
    """Under fsdp=8 the step all-gathers the sharded weight matrices, and nothing else moves
    between devices: no activation all-to-alls, no gathers of vectors kept replicated."""
    setup = _fsdp_setup()
    sharded = {x.size for x, s in zip(jax.tree.leaves(setup.abstract_state.student),
                                      jax.tree.leaves(setup.state_sharding.student))
               if s.spec != jax.sharding.PartitionSpec()}
    found = _collectives(setup)
    assert {kind for kind, _ in found} == {"all-gather"}
    assert {n for _, n in found} == sharded


def test_nonfinite_batch_skips_the_update_bit_for_bit_and_halts_after_k(tiny):
    spec = tiny
    setup = built(8)
    state = train_setup.init_state(setup)
    good = synthetic_batch(spec, 0)
    state, _ = setup.step(state, put(setup, good))
    before = jax.device_get(state)
    bad = dict(good, fg_mean=np.full_like(good["fg_mean"], np.nan))
    state, metrics = setup.step(state, put(setup, bad))
    after = jax.device_get(state)
    assert int(metrics["skipped"]) == 1 and int(metrics["skipped_total"]) == 1
    for name in ("student", "teacher", "opt_state", "dino_center", "ibot_center", "rng"):
        for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert int(after.step) == int(before.step) + 1
    assert int(metrics["halted_at"]) == -1
    state, metrics = setup.step(state, put(setup, bad))
    assert int(metrics["halted_at"]) == 2
    assert "dino" in nonfinite_terms(int(metrics["nonfinite"]))
    halted = jax.device_get(state)
    state, metrics = setup.step(state, put(setup, good))  # halted: even a good batch is a no-op
    assert int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(halted.student), jax.tree.leaves(jax.device_get(state).student)):
        np.testing.assert_array_equal(a, b)


def test_ema_teacher_and_last_layer_freeze(tiny):
    """teacher' = m·teacher + (1−m)·student' with the scheduled m; the prototypes stay
    bit-identical during the freeze (2 steps here) and move after it."""
    setup = built(8)
    state = train_setup.init_state(setup)
    assert tiny.schedules.freeze_last_layer_steps == 2
    history = [jax.device_get(state)]
    for i in range(3):
        state, metrics = setup.step(state, put(setup, synthetic_batch(tiny, i)))
        history.append(jax.device_get(state))
        m = float(metrics["momentum"])
        old, new = history[-2], history[-1]
        for t0, t1, s1 in zip(jax.tree.leaves(old.teacher), jax.tree.leaves(new.teacher),
                              jax.tree.leaves(new.student)):
            np.testing.assert_allclose(t1, np.float32(m) * t0 + np.float32(1 - m) * s1,
                                       rtol=1e-6, atol=1e-9)
    for head in ("dino_head", "ibot_head"):
        proto = [h.student[head]["last_layer"] for h in history]
        np.testing.assert_array_equal(proto[0], proto[1])
        np.testing.assert_array_equal(proto[1], proto[2])
        assert not np.array_equal(proto[2], proto[3])
    # The rest of the student moves during the freeze (step 0 has lr 0: the warm-up's start).
    assert not np.array_equal(history[1].student["dino_head"]["mlp"][0]["kernel"],
                              history[2].student["dino_head"]["mlp"][0]["kernel"])
