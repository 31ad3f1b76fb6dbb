"""Orbax checkpoints of a training run: the whole state, the data position, the config.

Layout of a work directory::

    WORKDIR/config.json              the run's config (what `braindino-train` was given)
    WORKDIR/checkpoints/<step>/      state/  (the TrainState, Orbax, sharded arrays)
                                     data/   (the Grain iterator's position, one file per process)
                                     config/ (the config as JSON, for resume checks)
    WORKDIR/export/                  the teacher's backbone (braindino-convert's Flax layout)

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so a crash or kill during a save leaves the previous checkpoint as the latest.
A state whose parameters are not finite is refused before anything is written. Restores take
any mesh: arrays are read into the shardings of the state being restored into, so a run saved
on 8 devices restores onto 1 (the probes do this) or onto a larger pod.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from braindino_jax.models.convert import CheckpointError
from braindino_jax.models.heads import DINOHead
from braindino_jax.models.vit import VisionTransformer
from braindino_jax.train.state import TrainState

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
EXPORT = "export"


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists)."""
    return json.loads(config.to_json())


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves))


_finite = jax.jit(_all_finite)


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep`` plus every ``keep_every``-th."""

    def __init__(self, workdir: str, every: int, keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: TrainState, iterator: grain.DatasetIterator,
             config: ml_collections.ConfigDict) -> None:
        """Start an async save of ``state`` and the iterator's position at ``step``."""
        params = {"student": state.student, "teacher": state.teacher}
        if not bool(_finite(params)):
            raise CheckpointError(
                f"{self.directory}: not saving step {step}: the parameters are not finite")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            config=ocp.args.JsonSave(config_dict(config))), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def saved_config(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def restore(self, state_spec: TrainState, iterator: grain.DatasetIterator | None,
                step: int | None = None) -> tuple[int, TrainState]:
        """The latest readable checkpoint (or ``step``), into ``state_spec``'s shardings.

        A latest checkpoint that cannot be read (a corrupt or truncated file) is skipped with a
        warning, and the one before it is used; nothing is deleted.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        errors = []
        for s in candidates:
            try:
                items = {"state": ocp.args.StandardRestore(state_spec)}
                if iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(iterator)
                restored = self._manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as exc:  # Orbax/TensorStore raise many types for damaged files
                errors.append(f"step {s}: {type(exc).__name__}: {exc}")
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                            self.directory, s, type(exc).__name__, str(exc)[:300])
                continue
            return s, restored["state"]
        raise CheckpointError(f"{self.directory}: no readable checkpoint:\n  " + "\n  ".join(errors))

    def close(self) -> None:
        self._manager.close()


def find_step(workdir: str, step: int | None = None) -> tuple[str, int]:
    """The checkpoint directory of ``workdir`` and its latest step (or ``step``, checked)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{workdir}: not a training work directory (no {CHECKPOINTS}/)")
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if not steps:
        raise CheckpointError(f"{directory}: holds no finished checkpoint")
    if step is None:
        return directory, steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint at step {step}; saved steps: {steps}")
    return directory, step


def load_teacher(workdir: str, step: int | None = None
                 ) -> tuple[VisionTransformer, dict[str, DINOHead]]:
    """The EMA teacher (backbone and heads) of a run's latest checkpoint, or of ``step``.

    Reads only the teacher's arrays, onto the default device, whatever mesh the run used; a
    latest checkpoint that cannot be read falls back to the previous one with a warning.
    """
    from braindino_jax.train.config import model_configs
    from braindino_jax.train.state import SSLNetworks

    directory, latest = find_step(workdir, step)
    candidates = [latest] if step is not None else sorted(
        (int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
    errors = []
    for s in candidates:
        path = os.path.join(directory, str(s))
        try:
            with open(os.path.join(path, "config", "metadata")) as f:
                config = ml_collections.ConfigDict(json.load(f))
            vit, dino_head, ibot_head = model_configs(config)
            vit = vit.replace(drop_path_rate=0.0)
            abstract = nnx.eval_shape(lambda: SSLNetworks(vit, dino_head, ibot_head, rngs=nnx.Rngs(0)))
            graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = {"teacher": jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)}
            with ocp.PyTreeCheckpointer() as ckptr:
                restored = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
                    item=target, partial_restore=True,
                    restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=device), target)))
        except Exception as exc:  # unreadable or damaged: say so, try the one before
            errors.append(f"step {s}: {type(exc).__name__}: {exc}")
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
            continue
        buffers = jax.jit(lambda: nnx.split(SSLNetworks(vit, dino_head, ibot_head, rngs=nnx.Rngs(0)),
                                            nnx.Param, ...)[2])()
        teacher = nnx.merge(graphdef, restored["teacher"], buffers)
        teacher.eval()
        return teacher.backbone, {"dino_head": teacher.dino_head, "ibot_head": teacher.ibot_head}
    raise CheckpointError(f"{directory}: no readable checkpoint:\n  " + "\n  ".join(errors))


def load_teacher_backbone(workdir: str, step: int | None = None) -> VisionTransformer:
    """The teacher backbone of a run (what the probes evaluate)."""
    return load_teacher(workdir, step)[0]


def export_teacher(state: TrainState, networks: Any, directory: str) -> str:
    """Write the teacher's backbone (and heads) as a braindino-convert Flax folder.

    The probes load it (``export:DIR``), and ``braindino-convert to-torch DIR out.safetensors``
    turns it into Meta's DINOv3 layout. Written to a temporary folder and renamed.
    """
    from braindino_jax.models.convert import save_flax_checkpoint

    teacher = networks.teacher(jax.device_get(state.teacher))
    backbone = teacher.backbone
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    if jax.process_index() == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        save_flax_checkpoint(tmp, backbone, {"dino_head": teacher.dino_head,
                                             "ibot_head": teacher.ibot_head})
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    return directory

