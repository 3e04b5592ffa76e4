"""NUMA topology (DESIGN §6): which CPUs form which node, and which node each pool worker is on.

The topology comes from ``/sys/devices/system/node/node<N>/cpulist`` (restricted to the CPUs
this process may run on). ``KT_AMX_NUMA`` overrides it, to simulate several nodes on a
one-node host (tests) or to pin an explicit layout:

- ``KT_AMX_NUMA=2`` splits the allowed CPUs, in order, into 2 simulated nodes of (nearly)
  equal size (with fewer CPUs than nodes, nodes share CPUs);
- ``KT_AMX_NUMA="0-7;8-15"`` names each node's CPUs (cpulist syntax, nodes separated by ``;``);
- ``KT_AMX_NUMA=1`` or ``off``: one node with every allowed CPU (no NUMA handling).

Simulated nodes have no physical id: their memory is placed by first touch only (no mbind).
The environment is read each time a layer is created, not cached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("kt_amx")

NODE_ROOT = Path("/sys/devices/system/node")
CPU_ROOT = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Topology:
    """CPUs of each node (node index = position); ``physical`` holds the kernel's node ids, or
    None for a simulated layout."""

    nodes: tuple[tuple[int, ...], ...]
    physical: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.nodes or any(not cpus for cpus in self.nodes):
            raise ValueError(f"a NUMA topology needs at least one CPU per node, got {self.nodes}")
        if self.physical is not None and len(self.physical) != len(self.nodes):
            raise ValueError("one physical id per node")

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def simulated(self) -> bool:
        return self.physical is None

    def node_of_cpu(self, cpu: int) -> int:
        """Index of the first node holding ``cpu``, -1 if none."""
        return next((j for j, cpus in enumerate(self.nodes) if cpu in cpus), -1)

    def mbind_node(self, j: int) -> int:
        """Kernel node id for mbind, -1 for a simulated node."""
        return -1 if self.physical is None else self.physical[j]


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def allowed_cpus() -> tuple[int, ...]:
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def split_evenly(cpus: tuple[int, ...], n: int) -> tuple[tuple[int, ...], ...]:
    """``n`` contiguous groups of ``cpus``; with fewer CPUs than groups, groups share CPUs."""
    if len(cpus) >= n:
        return tuple(cpus[len(cpus) * j // n: len(cpus) * (j + 1) // n] for j in range(n))
    return tuple((cpus[j % len(cpus)],) for j in range(n))


def from_sysfs(allowed: tuple[int, ...]) -> Topology:
    nodes, ids = [], []
    paths = sorted(NODE_ROOT.glob("node[0-9]*"), key=lambda p: int(p.name[4:])) if NODE_ROOT.is_dir() else []
    for path in paths:
        try:
            cpus = tuple(c for c in parse_cpulist((path / "cpulist").read_text()) if c in allowed)
        except (OSError, ValueError):
            continue
        if cpus:  # memory-only nodes and nodes outside our affinity hold no workers
            nodes.append(cpus)
            ids.append(int(path.name[4:]))
    if not nodes:
        return Topology((allowed,), (0,))
    return Topology(tuple(nodes), tuple(ids))


def read_topology(env: str | None = None) -> Topology:
    """The host's topology, or the one ``KT_AMX_NUMA`` (or ``env``) describes."""
    allowed = allowed_cpus()
    spec = (os.environ.get("KT_AMX_NUMA", "") if env is None else env).strip()
    if not spec:
        return from_sysfs(allowed)
    if spec.lower() in ("off", "0", "1", "none"):
        return Topology((allowed,), None)
    if spec.isdigit():
        return Topology(split_evenly(allowed, int(spec)), None)
    try:
        nodes = tuple(parse_cpulist(part) for part in spec.split(";"))
    except ValueError:
        raise ValueError(f"KT_AMX_NUMA={spec!r}: expected a node count or CPU lists like '0-7;8-15'") from None
    return Topology(nodes, None)


# ------------------------------------------------------------------------- the worker pool


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def physical_cores(cpus: tuple[int, ...]) -> tuple[int, ...]:
    """One logical CPU per physical core among ``cpus`` (SMT siblings dropped)."""
    seen, out = set(), []
    for cpu in cpus:
        topo = CPU_ROOT / f"cpu{cpu}" / "topology"
        key = (_read_int(topo / "physical_package_id", 0), _read_int(topo / "core_id", cpu))
        if key not in seen:
            seen.add(key)
            out.append(cpu)
    return tuple(out)


def pool_cpus(topology: Topology, n_threads: int) -> list[int]:
    """Pinning for ``n_threads`` workers spread over the nodes in proportion to their cores,
    node by node (worker ids of one node are contiguous). The first core of node 0 is left to
    the driving thread when there are more cores than workers."""
    cores = [list(physical_cores(cpus)) for cpus in topology.nodes]
    total = sum(len(c) for c in cores)
    if total > n_threads and len(cores[0]) > 1:
        cores[0] = cores[0][1:]
        total -= 1
    shares = [n_threads * len(c) // total for c in cores]
    for j in sorted(range(len(cores)), key=lambda j: -len(cores[j]))[: n_threads - sum(shares)]:
        shares[j] += 1
    cpus: list[int] = []
    for c, share in zip(cores, shares):
        cpus.extend(c[i % len(c)] for i in range(share))
    return cpus


def worker_nodes(topology: Topology, pool_size: int, worker_cpu) -> list[int]:
    """Node index of each pool worker: the node of the CPU it is pinned to; unpinned workers
    (or CPUs outside every node) in contiguous blocks over the nodes."""
    n = topology.n_nodes
    out = []
    for w in range(pool_size):
        cpu = worker_cpu(w)
        node = topology.node_of_cpu(cpu) if cpu >= 0 else -1
        out.append(node if node >= 0 else w * n // max(pool_size, 1))
    return out
