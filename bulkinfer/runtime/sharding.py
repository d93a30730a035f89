"""Placing work on devices: a 2-D ("data", "model") mesh over the local devices.

Batches are split along "data" (rows) and replicated along "model"; parameters are replicated along
"data" and, when `model_parallel > 1`, split along "model" as the model's `param_spec` says (for a
model larger than one device).  With model_parallel=1 this is plain data parallelism.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# param_spec(path, leaf) -> PartitionSpec naming MODEL for the axes to split, or None to replicate.
ParamSpec = Callable[[tuple, jax.Array], PartitionSpec | None]


def make_mesh(devices: Sequence[jax.Device] | None, model_parallel: int) -> Mesh:
    devices = list(devices) if devices is not None else jax.local_devices()
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(
            f"model_parallel={model_parallel} does not divide the {len(devices)} devices; "
            f"use a divisor of {len(devices)}")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)  # [data, model]
    return Mesh(grid, (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch inputs [B, ...] of any rank: rows split over "data", the rest replicated (also over "model")."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def param_shardings(params, mesh: Mesh, param_spec: ParamSpec | None):
    """A pytree of NamedShardings like `params`: replicated, or split along MODEL where param_spec says."""
    replicated = NamedSharding(mesh, PartitionSpec())
    if param_spec is None or mesh.shape[MODEL] == 1:
        return jax.tree.map(lambda _: replicated, params)

    def place(path, leaf):
        spec = param_spec(path, leaf)
        if spec is None:
            return replicated
        for axis, name in enumerate(spec):
            if name == MODEL and leaf.shape[axis] % mesh.shape[MODEL]:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split "
                    f"{mesh.shape[MODEL]} ways along axis {axis}; choose model_parallel dividing {leaf.shape[axis]}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, params)
