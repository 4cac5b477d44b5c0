"""One fused FIRE -> Langevin run over the devices of several processes (hosts).

Start one copy per host; process 0's address is the coordinator::

    python examples/multihost.py 0 2 host0:12345     # on host 0
    python examples/multihost.py 1 2 host0:12345     # on host 1

To try it on one machine, start both copies there with ``127.0.0.1:12345`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu`` (two CPU devices per
process). Every process builds the same structure list (or reads the same file); the run places
whole systems on each device (docs/scale-out.md, docs/semantics.md §21) and each process
receives the systems that ran on its own devices.
"""

import sys

import jax

process_id, num_processes, coordinator = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import fused_dynamics as fd  # noqa: E402

N_SYSTEMS = int(sys.argv[4]) if len(sys.argv) > 4 else 32

lj = fd.models.LennardJones(sigma=3.405, epsilon=0.0104, cutoff=6.0, switch_onset=5.0)
structures = []
for i in range(N_SYSTEMS):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 1)
    atoms.rattle(0.05, seed=i)
    structures.append(atoms)

mesh = Mesh(np.array(jax.devices()), ("systems",))  # the devices of every process
devices = len(jax.devices())
sampler = fd.SizeAwareSampler(  # global capacities: 2 systems of 16 atoms per device
    structures, max_atoms=32 * devices, max_systems=2 * devices, max_atoms_per_system=16
)
fire = fd.FIRE(lj, convergence_hook=fd.ConvergenceHook.from_fmax(0.05), n_steps=200)
md = fd.NVTLangevin(lj, dt=2.0, temperature=80.0, friction=0.01, seed=0, n_steps=50)
sink = fd.HostMemory()
stats = (fire + md).run(sampler=sampler, sinks=[sink], refill_frequency=25, mesh=mesh)
ids = sorted(a.info["system_id"] for a in sink.atoms)
print(f"process {jax.process_index()}: {len(ids)} systems {ids}, {stats.steps} steps")
