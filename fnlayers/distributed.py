"""Data parallelism over a :class:`jax.sharding.Mesh`, on JAX's own SPMD partitioner.

``fit(..., mesh=mesh)`` and ``make_train_step(..., mesh=mesh)`` use a :class:`DataParallel`:
every global batch is split along the batch axis over the mesh axis named ``data_axis``
(default ``"data"``), and parameters, model state and optimizer state are replicated on every
device. The step is one ``jax.jit`` program over *global* arrays, traced under
``jax.set_mesh``, which XLA partitions: each device computes its slice of the batch and the
gradients of the replicated parameters are summed across devices by an all-reduce that XLA
inserts. Because the program is the single-device program on the global batch, a mesh changes
no numbers beyond the order of floating-point sums: batch norm sees the global batch's
statistics, the loss is the global batch's loss, dropout draws the global batch's mask.

Several processes (hosts) work the same way after ``jax.distributed.initialize(...)``: the mesh
spans every process's devices, each process places only the rows of a global batch that its
own devices hold (:meth:`DataParallel.shard`, or :meth:`DataParallel.shard_local` for data the
process loaded itself) and reads replicated results from its own devices
(:meth:`DataParallel.to_host`).

Example (one host, all its devices)::

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    ts, history = fl.train.fit(model, loss, opt, (x, y), batch_size=256, iterations=1000,
                               mesh=mesh)          # batch_size is the global batch
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["BATCH_NORM_MODES", "DataParallel", "data_parallel", "is_main_process"]

#: How batch norm treats a batch split over devices, see :func:`fnlayers.train.make_train_step`.
BATCH_NORM_MODES = ("global", "per_device")


def data_parallel(
    mesh: Mesh, data_axis: str = "data", *, fn: str = "data_parallel"
) -> DataParallel:
    """Validates ``mesh`` and ``data_axis`` and returns the :class:`DataParallel` plan.

    Args:
      mesh: a :class:`jax.sharding.Mesh` (e.g. ``jax.make_mesh((jax.device_count(),),
        ("data",))``); its axis types (Explicit, the default of ``jax.make_mesh``, or Auto)
        do not matter: the step is partitioned by XLA from the shardings of its arguments.
      data_axis: the name of the mesh axis the batch is split over. Other mesh axes, if any,
        hold replicas.
      fn: the public function to name in errors.

    Raises:
      TypeError: ``mesh`` is not a Mesh.
      ValueError: the mesh has no axis ``data_axis``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{fn}: mesh={mesh!r} must be a jax.sharding.Mesh, e.g. "
            'jax.make_mesh((jax.device_count(),), ("data",))'
        )
    if not isinstance(data_axis, str) or data_axis not in mesh.axis_names:
        raise ValueError(
            f"{fn}: data_axis={data_axis!r} is not an axis of the mesh, whose axes are "
            f"{tuple(mesh.axis_names)}"
        )
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    return DataParallel(auto, data_axis)


def is_main_process() -> bool:
    """True in the process that writes files (checkpoints, histories): process 0."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A batch split over one axis of a mesh, everything else replicated.

    Attributes:
      mesh: the mesh, with every axis of type Auto (XLA partitions the step).
      axis: the mesh axis the batch axis is split over.
    """

    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        """The number of slices a global batch is split into (devices along ``axis``)."""
        return int(self.mesh.shape[self.axis])

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @functools.cached_property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axis))

    def context(self) -> contextlib.AbstractContextManager:
        """``jax.set_mesh(mesh)``: the context every step is traced and run in (the
        convolutions read it to tell that their batch is split)."""
        return jax.set_mesh(self.mesh)

    def splits_evenly(self, batch_size: int) -> bool:
        """Whether a batch of ``batch_size`` splits evenly over the devices and processes."""
        return batch_size % self.size == 0 and batch_size % jax.process_count() == 0

    def check_batch_size(self, batch_size: int, *, fn: str, name: str = "batch_size") -> None:
        """Raises a ValueError unless ``batch_size`` splits evenly over the devices and over
        the processes."""
        if batch_size % self.size:
            raise ValueError(
                f"{fn}: {name}={batch_size} must be a multiple of the {self.size} devices of "
                f"mesh axis {self.axis!r} (the global batch is split evenly over them)"
            )
        if batch_size % jax.process_count():
            raise ValueError(
                f"{fn}: {name}={batch_size} must be a multiple of the {jax.process_count()} "
                "processes"
            )

    def replicate(self, tree: Any) -> Any:
        """Every leaf as a global array held whole by every device of the mesh.

        Host values (numpy, Python scalars, single-device jax arrays) must be the same in every
        process; leaves already replicated on this mesh are kept as they are.
        """
        return jax.tree.map(lambda a: self._place(a, self.replicated), tree)

    def shard(self, tree: Any) -> Any:
        """A global batch (every leaf ``(B, ...)``, the same full batch in every process) as
        global arrays split along axis 0; each process transfers only its own devices' rows."""
        return jax.tree.map(lambda a: self._place(a, self.batch_sharding), tree)

    def shard_local(self, tree: Any) -> Any:
        """This process's rows of a global batch (every leaf ``(B / process_count, ...)``,
        rows in process order) as global arrays of ``B`` rows split along axis 0."""
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(a)),
            tree,
        )

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch of ``batch_size`` that this process's devices hold
        (one contiguous run: a process's devices are adjacent along the data axis)."""
        index_map = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        starts = [idx[0].indices(batch_size) for idx in index_map.values()]
        lo = min(s[0] for s in starts)
        hi = max(s[1] for s in starts)
        return slice(lo, hi)

    def to_host(self, tree: Any) -> Any:
        """Replicated global arrays back as arrays on this process's first device (readable
        with ``np.asarray``/``float`` in every process); other leaves unchanged."""

        def local(a):
            if isinstance(a, jax.Array) and not a.is_fully_addressable:
                return a.addressable_data(0)
            return a

        return jax.tree.map(local, tree)

    def _place(self, a, sharding: NamedSharding):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(a)
            data = self._place(np.asarray(jax.random.key_data(a)), sharding)
            return jax.random.wrap_key_data(data, impl=impl)
        if isinstance(a, jax.Array) and a.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
