"""Cutting a packed experts layer into per-NUMA-node parts and placing each on its node.

``split`` (default): node j holds rows ``[I_j0, I_j1)`` of gate/up and the same columns of
down for every owned expert: the intermediate dimension is cut, memory is not doubled. The
cuts are multiples of the packed formats' unit (the quantisation group along I, at least 32:
whole 16-row panels of gate/up, whole groups of down); when I has fewer units than there are
nodes, fewer nodes are used (logged). Each node computes a partial y; the C layer
(``kt_moe_combine``) sums the partials in node order, so results do not depend on timing.

``mirror``: every node holds a full copy; in each forward node j computes the active experts
(those with routed pairs, in slot order) of rank j, j + n, ... from its own copy, and the
partial outputs are summed in node order as for split (so decode uses every node too).

The packed panels are cut without unpacking (kt_internal.h): a panel of 16 rows is
``[k / step][64 bytes]`` with step = 2 (bf16), 4 (int8), 8 (int4) k per 64-byte vector, and
scales are ``[n/16][k/G][16]``; a per-channel scale (G = k) applies to every column slice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kt_amx import _lib
from kt_amx.numa import Topology
from kt_amx.packing import LayerFormat, PackedMatrix

logger = logging.getLogger("kt_amx")

MODES = ("split", "mirror", "off")
#: k per 64-byte vector of a panel (bf16 elements are 2 bytes: 32 elements per vector).
K_STEP = {"bf16": 2, "int8": 4, "int4": 8}


@dataclass(frozen=True)
class Plan:
    """How one layer is laid out over the nodes: ``bounds[j]`` = (I_j0, I_j1) for split, the
    whole range for every node in mirror."""

    mode: str
    bounds: tuple[tuple[int, int], ...]
    topology: Topology

    @property
    def n_parts(self) -> int:
        return len(self.bounds)


def split_unit(fmt: LayerFormat, inter: int) -> int:
    """Cuts of I must be multiples of this: the group along I (down's k), at least 32."""
    if fmt.format == "bf16" or fmt.group == 0:
        return 32
    return max(32, fmt.group_for(inter))


def split_bounds(inter: int, n: int, unit: int) -> tuple[tuple[int, int], ...]:
    units = inter // unit
    n = max(1, min(n, units))
    return tuple((unit * (units * j // n), unit * (units * (j + 1) // n)) for j in range(n))


def make_plan(mode: str, topology: Topology, fmt: LayerFormat, inter: int) -> Plan | None:
    """None when the layer stays in one piece (mode off, one node, or I too small)."""
    if mode not in MODES:
        raise ValueError(f"kt-amx option numa must be one of {MODES}, got {mode!r}")
    n = topology.n_nodes
    if mode == "off" or n == 1:
        return None
    if mode == "mirror":
        return Plan("mirror", ((0, inter),) * n, topology)
    unit = split_unit(fmt, inter)
    bounds = split_bounds(inter, n, unit)
    if len(bounds) < n:
        logger.info("kt-amx: I=%d has %d cuts of %d (the %s format's unit); splitting over %d of %d NUMA nodes",
                    inter, inter // unit, unit, fmt.format, len(bounds), n)
    if len(bounds) == 1:
        return None
    return Plan("split", bounds, topology)


# ------------------------------------------------------------------------------ cutting


def _take(t: torch.Tensor | None, dim: int, start: int, stop: int) -> torch.Tensor | None:
    return None if t is None else t.narrow(dim, start, stop - start).contiguous()


def slice_rows(p: PackedMatrix, r0: int, r1: int) -> PackedMatrix:
    """Output rows [r0, r1) (multiples of 16): whole panels."""
    S, P = p.w.shape[0], p.n // 16
    w = p.w.view(S, P, -1).narrow(1, r0 // 16, (r1 - r0) // 16).reshape(S, -1).contiguous()
    return PackedMatrix(w, _take(p.scale, 1, r0 // 16, r1 // 16), _take(p.zmin, 1, r0 // 16, r1 // 16), r1 - r0, p.k)


def slice_cols(p: PackedMatrix, fmt: LayerFormat, c0: int, c1: int) -> PackedMatrix:
    """Input columns [c0, c1) (multiples of the group, or of 32 per channel)."""
    S, P, step = p.w.shape[0], p.n // 16, K_STEP[fmt.format]
    w = p.w.view(S, P, p.k // step, -1).narrow(2, c0 // step, (c1 - c0) // step).reshape(S, -1).contiguous()
    scale, zmin = p.scale, p.zmin
    if fmt.format != "bf16" and fmt.group != 0:
        G = fmt.group_for(p.k)
        scale, zmin = _take(scale, 2, c0 // G, c1 // G), _take(zmin, 2, c0 // G, c1 // G)
    return PackedMatrix(w, scale, zmin, p.n, c1 - c0)


def cut(packed: dict[str, PackedMatrix], fmt: LayerFormat, i0: int, i1: int) -> dict[str, PackedMatrix]:
    return {"gate": slice_rows(packed["gate"], i0, i1), "up": slice_rows(packed["up"], i0, i1),
            "down": slice_cols(packed["down"], fmt, i0, i1)}


# ----------------------------------------------------------------------------- placing


def place(t: torch.Tensor | None, node: int, plan: Plan, node_of_worker: list[int]) -> torch.Tensor | None:
    """A copy of ``t`` in fresh memory written by node ``node``'s workers (first touch), with
    an mbind hint on a real node. Falls back to ``t`` itself when no memory can be mapped."""
    if t is None or t.numel() == 0:
        return t
    ffi, lib = _lib.kernels()
    nbytes = t.numel() * t.element_size()
    raw = lib.kt_numa_alloc(nbytes)
    if raw == ffi.NULL:
        logger.warning("kt-amx: could not map %d bytes for NUMA node %d; weights stay where they are", nbytes, node)
        return t
    owner = ffi.gc(raw, lambda p: lib.kt_numa_free(p, nbytes))
    dst = torch.frombuffer(ffi.buffer(owner, nbytes), dtype=torch.uint8)  # keeps `owner` alive
    src = t.contiguous()
    rc = lib.kt_numa_copy(raw, _lib.address(src), nbytes, ffi.new("int32_t[]", node_of_worker), len(node_of_worker),
                          node, plan.topology.mbind_node(node))
    if rc != 0:
        raise RuntimeError(f"kt-amx: copying weights to NUMA node {node} failed ({rc})")
    return dst.view(t.dtype).view(t.shape)


def place_part(part: dict[str, PackedMatrix], node: int, plan: Plan, node_of_worker: list[int]):
    return {name: PackedMatrix(place(p.w, node, plan, node_of_worker), place(p.scale, node, plan, node_of_worker),
                               place(p.zmin, node, plan, node_of_worker), p.n, p.k)
            for name, p in part.items()}


def build_parts(packed: dict[str, PackedMatrix], fmt: LayerFormat, plan: Plan,
                node_of_worker: list[int]) -> list[dict[str, PackedMatrix]]:
    """The packed matrices of each node, placed on it. For split the parts together hold
    exactly the layer's bytes; the caller drops ``packed`` afterwards."""
    parts = []
    for j, (i0, i1) in enumerate(plan.bounds):
        part = packed if plan.mode == "mirror" else cut(packed, fmt, i0, i1)
        parts.append(place_part(part, j, plan, node_of_worker))
    return parts


def node_of_workers(topology: Topology) -> list[int]:
    """Node index of each worker of the (started) pool."""
    from kt_amx.numa import worker_nodes

    lib = _lib.kernels()[1]
    return worker_nodes(topology, lib.kt_pool_size(), lib.kt_pool_worker_cpu)


def join_parts(parts: list[dict[str, PackedMatrix]], fmt: LayerFormat) -> dict[str, PackedMatrix]:
    """Inverse of ``cut`` over all parts: the whole layer's packed matrices."""

    def cat(ts, dim):
        return None if ts[0] is None else torch.cat(ts, dim=dim)

    out = {}
    for name in ("gate", "up"):
        ps = [part[name] for part in parts]
        S = ps[0].w.shape[0]
        w = torch.cat([p.w.view(S, p.n // 16, -1) for p in ps], dim=1).reshape(S, -1)
        out[name] = PackedMatrix(w, cat([p.scale for p in ps], 1), cat([p.zmin for p in ps], 1),
                                 sum(p.n for p in ps), ps[0].k)
    ps = [part["down"] for part in parts]
    S, step = ps[0].w.shape[0], K_STEP[fmt.format]
    w = torch.cat([p.w.view(S, p.n // 16, p.k // step, -1) for p in ps], dim=2).reshape(S, -1)
    per_channel = fmt.format == "bf16" or fmt.group == 0
    scale = ps[0].scale if per_channel else cat([p.scale for p in ps], 2)
    zmin = ps[0].zmin if per_channel else cat([p.zmin for p in ps], 2)
    out["down"] = PackedMatrix(w, scale, zmin, ps[0].n, sum(p.k for p in ps))
    return out
