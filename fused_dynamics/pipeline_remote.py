"""Moving systems between pipeline stages on different processes (docs/semantics.md §16).

After ``jax.distributed.initialize()`` a :class:`~fused_dynamics.DistributedPipeline` may put
consecutive stages on the devices of different processes. Every process then runs the same
rounds in lockstep; at the end of each round, for every such boundary, the two processes call
one compiled collective: a ``ppermute`` in ``jax.shard_map`` over a mesh of two devices (the
first device of each stage) that swaps two fixed-size buffers:

- the sender's *parcel*: up to ``buffer_size`` rows (:mod:`fused_dynamics.pipeline_transfer`)
  stacked and zero-padded, plus an int32 header (how many, whether the sender is done, their
  ids and atom counts);
- the receiver's header: how much room its buffer has.

The rows therefore go device to device with JAX's collectives (no sockets or pickles of our
own, and never through the host); only the header's small integers are read on the host. The
sender sends at most the room the receiver reported in the previous round, so each side holds
at most ``buffer_size`` systems (back-pressure: the rest wait in the sender's slots).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .pipeline_transfer import DeviceBuffer

__all__ = ["exchange"]

_AXIS = "pipe"


@functools.cache
def _swap(mesh: Mesh):
    def body(tree):
        return jax.tree_util.tree_map(
            lambda x: jax.lax.ppermute(x, _AXIS, perm=[(0, 1), (1, 0)]), tree
        )

    return jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P(_AXIS), out_specs=P(_AXIS), check_vma=False)
    )


def exchange(
    src_device, dst_device, outbox: DeviceBuffer, inbox: DeviceBuffer, room: int, template
) -> int:
    """One exchange across a boundary between two processes; both call it in the same round.

    Parameters
    ----------
    src_device, dst_device : jax.Device
        The first device of the sending and of the receiving stage.
    outbox : DeviceBuffer
        On the sender's process, what its stage forwarded (rows sent are removed from it).
    inbox : DeviceBuffer
        On the receiver's process, where arriving rows go (closed when the sender is done).
    room : int
        On the sender's process: the room the receiver reported last (rows sent at most).
    template : dict of jax.ShapeDtypeStruct
        The shape of one row (the same on both sides).

    Returns
    -------
    int
        On the sender's process, the room the receiver reports now; on the receiver's, 0.
    """
    size = inbox.size
    sender = src_device.process_index == jax.process_index()
    mine = src_device if sender else dst_device
    header = np.zeros(2 + 2 * size, np.int32)
    if sender:
        entries = outbox.take(outbox.max_atoms, min(room, size))
        header[0] = len(entries)
        header[1] = outbox.exhausted
        for i, (sid, n, _) in enumerate(entries):
            header[2 + i], header[2 + size + i] = sid, n
        rows = [jax.device_put(row, mine) for _, _, row in entries]
    else:
        header[0] = size - len(inbox)
        rows = []
    parcel = {}
    for f, t in template.items():
        pad = jax.device_put(np.zeros(t.shape, t.dtype), mine)
        parcel[f] = jnp.stack([r[f] for r in rows] + [pad] * (size - len(rows)))[None]
    parcel["header"] = jax.device_put(header[None], mine)
    mesh = Mesh(np.array([src_device, dst_device]), (_AXIS,))
    sharding = NamedSharding(mesh, P(_AXIS))
    glob = {
        f: jax.make_array_from_single_device_arrays((2,) + x.shape[1:], sharding, [x])
        for f, x in parcel.items()
    }
    out = _swap(mesh)(glob)
    local = {f: x.addressable_shards[0].data[0] for f, x in out.items()}
    got = np.asarray(local.pop("header"))
    if sender:
        return int(got[0])
    for i in range(int(got[0])):
        sid, n = int(got[2 + i]), int(got[2 + size + i])
        inbox.queue.append((sid, n, {f: x[i] for f, x in local.items()}))
        inbox.received += 1
    inbox.peak = max(inbox.peak, len(inbox))
    if got[1]:
        inbox.close()
    return 0
