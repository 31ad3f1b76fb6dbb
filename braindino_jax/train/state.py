"""The train state: one pytree holding everything a run needs to continue.

``TrainState`` carries the student (backbone, DINO head, iBOT head), its EMA teacher (the same
structure), the optimizer state, the DINO and iBOT centers, the step, the PRNG key, the
non-finite guard's counters and, in stage 2, the frozen Gram teacher's backbone. It is a plain
pytree, so shardings (``train.sharding``), the jitted step and Orbax checkpoints all see the
whole of it.

Parameters are ``nnx.State`` trees of ``nnx.Param`` only; the modules' static structure (the
graph definitions) and their fixed buffers (RoPE periods) live in :class:`Networks`, outside
the state, because they never change and need not be saved.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from braindino_jax.models.config import ViTConfig
from braindino_jax.models.heads import DINOHead, HeadConfig
from braindino_jax.models.vit import VisionTransformer


class SSLNetworks(nnx.Module):
    """Backbone + DINO head + iBOT head: the student, and (as a copy) the EMA teacher."""

    def __init__(self, vit: ViTConfig, dino_head: HeadConfig, ibot_head: HeadConfig, *,
                 rngs: nnx.Rngs):
        self.backbone = VisionTransformer(vit, rngs=rngs)
        self.dino_head = DINOHead(dino_head, rngs=rngs)
        self.ibot_head = DINOHead(ibot_head, rngs=rngs)


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # int32 scalar: batches consumed (skipped ones included)
    rng: jax.Array                  # uint32 key data; step keys are fold_in(key, step)
    student: nnx.State
    teacher: nnx.State
    opt_state: Any
    dino_center: jax.Array          # [K_dino] float32, used by softmax centering
    ibot_center: jax.Array          # [K_ibot] float32
    guard: dict[str, jax.Array]     # non-finite guard counters (see train.step)
    gram_teacher: nnx.State | None = None


def new_guard() -> dict[str, jax.Array]:
    """Counters of the non-finite guard: all zero, ``halted_at`` = -1 (not halted)."""
    return {
        "skipped": jnp.zeros((), jnp.int32),       # skipped updates in total
        "consecutive": jnp.zeros((), jnp.int32),   # skipped updates in a row
        "halted_at": jnp.full((), -1, jnp.int32),  # step at which the run gave up, or -1
        "nonfinite": jnp.zeros((), jnp.int32),     # bit mask of the terms that were non-finite
    }


@dataclasses.dataclass(frozen=True)
class Networks:
    """Graph definitions and fixed buffers of the student, the teacher and the Gram teacher."""

    vit: ViTConfig
    dino_head: HeadConfig
    ibot_head: HeadConfig
    student_def: Any
    teacher_def: Any
    buffers: Any
    gram_def: Any
    gram_buffers: Any

    def student(self, params: nnx.State) -> SSLNetworks:
        """The student in training mode (drop path, RoPE augmentation; needs ``key=``)."""
        return nnx.merge(self.student_def, params, self.buffers)

    def teacher(self, params: nnx.State) -> SSLNetworks:
        """The teacher in evaluation mode (deterministic)."""
        return nnx.merge(self.teacher_def, params, self.buffers)

    def gram_teacher(self, params: nnx.State) -> VisionTransformer:
        return nnx.merge(self.gram_def, params, self.gram_buffers)


def _split(module: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    return nnx.split(module, nnx.Param, ...)


def build_networks(vit: ViTConfig, dino_head: HeadConfig, ibot_head: HeadConfig) -> Networks:
    """Abstract modules (no allocation) → their graph definitions; buffers are computed once."""
    make = lambda: SSLNetworks(vit, dino_head, ibot_head, rngs=nnx.Rngs(0))  # noqa: E731
    student = nnx.eval_shape(make)
    student.train()
    student_def, _, _ = _split(student)
    teacher = nnx.eval_shape(make)
    teacher.eval()
    teacher_def, _, _ = _split(teacher)
    # The buffers (RoPE periods) are small constants. Under jit only they are computed: the
    # parameter initialisers are dead code there, so even a ViT-g allocates nothing.
    buffers = jax.jit(lambda: _split(make())[2])()
    gram = nnx.eval_shape(lambda: VisionTransformer(vit, rngs=nnx.Rngs(0)))
    gram.eval()
    gram_def, _, _ = _split(gram)
    return Networks(vit, dino_head, ibot_head, student_def, teacher_def, buffers, gram_def,
                    buffers["backbone"])


def init_params(vit: ViTConfig, dino_head: HeadConfig, ibot_head: HeadConfig,
                seed: int) -> nnx.State:
    """Freshly initialised student parameters (call under ``jit`` to create them sharded)."""
    networks = SSLNetworks(vit, dino_head, ibot_head, rngs=nnx.Rngs(seed))
    return nnx.state(networks, nnx.Param)
