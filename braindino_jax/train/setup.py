"""Assemble a run: mesh, networks, optimizer, shardings, and the jitted init and step.

``build(spec)`` compiles nothing; ``init_state`` creates the train state directly in its
sharded layout (no device ever holds a full copy of FSDP-sharded weights), and ``step`` is the
train step under ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` and the state's
buffers donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from braindino_jax.data.pipeline import mask_group_bound
from braindino_jax.models.vit import VisionTransformer
from braindino_jax.train import pretrained, sharding
from braindino_jax.train.config import TrainSpec
from braindino_jax.train.optimizer import build_optimizer
from braindino_jax.train.param_groups import param_groups
from braindino_jax.train.state import Networks, TrainState, build_networks, init_params, new_guard
from braindino_jax.train.step import N_GLOBAL, make_step_fn


@dataclasses.dataclass
class TrainSetup:
    spec: TrainSpec
    mesh: Mesh
    networks: Networks
    optimizer: Any
    mask_bound: int                       # iBOT buffer slots per device group
    abstract_state: TrainState
    state_sharding: Any
    batch_sharding: NamedSharding
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def state_spec(self) -> TrainState:
        """The state as sharded ShapeDtypeStructs (for compiling ahead of a state)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch (for compiling ahead of data)."""
        b, size = self.spec.batch_size, self.spec.pipeline.image_size
        grid = self.spec.mask_grid
        sh = self.batch_sharding
        return {
            "pixels": jax.ShapeDtypeStruct((b, size, size), jnp.uint8, sharding=sh),
            "fg_mean": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=sh),
            "fg_std": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=sh),
            "masks": jax.ShapeDtypeStruct((b, N_GLOBAL, grid[0] * grid[1]), jnp.bool_, sharding=sh),
        }


def build(spec: TrainSpec, mesh: Mesh | None = None) -> TrainSetup:
    """Everything but the state; ``mesh`` defaults to ``spec.mesh_shape`` over all devices."""
    mesh = sharding.make_mesh(*spec.mesh_shape) if mesh is None else mesh
    networks = build_networks(spec.vit, spec.dino_head, spec.ibot_head)
    abstract_params = jax.eval_shape(lambda: init_params(spec.vit, spec.dino_head, spec.ibot_head, 0))
    o = spec.optim
    groups = param_groups(abstract_params, spec.vit.depth, o.layerwise_decay,
                          o.patch_embed_lr_mult, spec.vit.scan_blocks)
    optimizer = build_optimizer(groups, b1=o.b1, b2=o.b2, eps=o.eps, clip_grad=o.clip_grad)
    abstract_state = jax.eval_shape(lambda: _fresh_state(spec, optimizer, 0))
    state_sharding = sharding.state_shardings(abstract_state, mesh, spec.vit.scan_blocks)
    batch_sharding = sharding.batch_sharding(mesh)
    if spec.groups % mesh.size:
        # Each device must hold whole groups, or KoLeo/Gram/iBOT would cross devices.
        raise ValueError(f"mesh of {mesh.size} devices cannot hold the spec's {spec.groups} groups")
    bound = mask_group_bound(spec.pipeline, spec.process_count)
    step_fn = make_step_fn(spec, networks, optimizer, bound, sharding.replicated(mesh))
    step = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    return TrainSetup(spec, mesh, networks, optimizer, bound, abstract_state, state_sharding,
                      batch_sharding, step)


def _fresh_state(spec: TrainSpec, optimizer: Any, seed: int) -> TrainState:
    params = init_params(spec.vit, spec.dino_head, spec.ibot_head, seed)
    gram_teacher = None
    if spec.gram:
        gram_teacher = nnx.state(VisionTransformer(spec.vit, rngs=nnx.Rngs(seed)), nnx.Param)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        student=params,
        teacher=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        dino_center=jnp.zeros((spec.dino_head.out_dim,), jnp.float32),
        ibot_center=jnp.zeros((spec.ibot_head.out_dim,), jnp.float32),
        guard=new_guard(),
        gram_teacher=gram_teacher,
    )


def init_state(setup: TrainSetup, seed: int | None = None) -> TrainState:
    """A fresh, sharded train state; ``model.init_from`` and ``gram.teacher`` weights loaded."""
    spec = setup.spec
    seed = spec.seed if seed is None else seed
    state = jax.jit(lambda: _fresh_state(spec, setup.optimizer, seed),
                    out_shardings=setup.state_sharding)()
    if spec.init_from:
        backbone, heads = pretrained.load_weights(spec.init_from, spec.vit)
        values = nnx.to_pure_dict(state.student)
        values["backbone"] = nnx.to_pure_dict(pretrained.params_of(backbone))
        for name, head in heads.items():
            if name in values and head.config == getattr(spec, name):
                values[name] = nnx.to_pure_dict(pretrained.params_of(head))
        student = jax.tree.map(lambda x: x, state.student)  # same structure as the shardings
        nnx.replace_by_pure_dict(student, values)
        placed = jax.device_put(student, setup.state_sharding.student)
        state = state.replace(student=placed,
                              teacher=jax.device_put(student, setup.state_sharding.teacher))
    if spec.gram:
        backbone, _ = pretrained.load_weights(spec.gram_teacher, spec.vit, field="gram.teacher")
        state = state.replace(gram_teacher=jax.device_put(
            pretrained.params_of(backbone), setup.state_sharding.gram_teacher))
    return state
