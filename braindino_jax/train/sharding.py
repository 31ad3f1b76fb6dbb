"""Device mesh and sharding rules for the train state and the batch.

One mesh with axes ``("data", "fsdp")``. The batch's leading axis is split over both, so every
device holds ``global_batch / n_devices`` samples. Parameters follow FSDP (ZeRO-3) rules: every
large weight matrix (attention and MLP kernels, head layers, prototypes) has one axis split over
``fsdp`` — its largest axis that ``fsdp`` divides, never the stacked depth axis of scanned blocks
— and small or 1-D arrays (biases, norms, LayerScale, tokens, centers) are replicated. The
optimizer state has its parameters' shapes and paths, so the same rule shards it alike. XLA
then all-gathers each weight where a matmul needs it and reduce-scatters its gradient.

``jax.jit`` with these shardings is all there is (no pmap); the same code runs on one device,
8 CPU devices, a multi-GPU host, a multi-host GPU cluster and a TPU pod slice.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from braindino_jax.train.param_groups import path_names

MESH_AXES = ("data", "fsdp")
BATCH_SPEC = P(MESH_AXES)
MIN_SHARDED_SIZE = 2**14  # arrays smaller than this stay replicated: gathers would cost more


def make_mesh(data: int, fsdp: int) -> Mesh:
    """A (data, fsdp) mesh over all devices of all processes (jax.make_mesh orders them)."""
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def param_spec(names: tuple[str, ...], shape: tuple[int, ...], fsdp: int,
               scan_blocks: bool = False) -> P:
    """The partition spec of one state leaf under the FSDP rule (see the module docstring)."""
    if fsdp == 1 or len(shape) < 2 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return P()
    stacked = scan_blocks and "blocks" in names
    axes = [a for a in range(len(shape)) if not (stacked and a == 0) and shape[a] % fsdp == 0]
    if not axes:
        return P()
    axis = max(axes, key=lambda a: (shape[a], a))
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, scan_blocks: bool = False) -> Any:
    """NamedShardings for every leaf of a (possibly abstract) state tree."""
    fsdp = mesh.shape["fsdp"]

    def leaf(path, x):
        return NamedSharding(mesh, param_spec(path_names(path), tuple(x.shape), fsdp, scan_blocks))

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
