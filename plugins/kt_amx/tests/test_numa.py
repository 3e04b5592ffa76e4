"""NUMA (DESIGN §6) on this host with simulated nodes (``KT_AMX_NUMA``): the topology, the
split of I over nodes, and parity of split / mirror layers with the torch references for
every format and ISA path here, T in {1, 3, 16, 129}, owned subsets, repeated experts and the
asynchronous job path; plus a fresh process with several workers per node."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from kt_amx import _lib, numa, reference
from kt_amx.experts import AmxExperts
from kt_amx.numa_layer import make_plan, split_bounds
from kt_amx.packing import LayerFormat
from ktcore.errors import BackendError
from ktcore.ops.experts import ExpertsSpec, TorchExperts

E, K = 8, 4
TOKENS = (1, 3, 16, 129)
# name: (options, (H, I)); I = 160 or 320 has 5 units of its format: uneven cuts over 2 and 3 nodes
FORMATS = {
    "bf16": ({"format": "bf16"}, (96, 160)),
    "int8-g32": ({"format": "int8", "group_size": 32}, (96, 160)),
    "int8-channel": ({"format": "int8", "group_size": 0}, (96, 160)),
    "int4-g32": ({"format": "int4", "group_size": 32}, (96, 160)),
    "int4-sym-g64": ({"format": "int4", "group_size": 64, "symmetric": True}, (192, 320)),
}
OWNED = {"all": None, "subset": (1, 2, 5, 7)}


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def weights(H, I, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(E, I, H, generator=gen) * H**-0.5, "up": torch.randn(E, I, H, generator=gen) * H**-0.5,
            "down": torch.randn(E, H, I, generator=gen) * I**-0.5}


def routing(T, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[0, 1] = ids[0, 0]  # a repeated expert
    if T > 1:
        ids[1, -1] = E  # padding id
    return ids, torch.rand(T, K, generator=gen)


def all_experts(amx) -> dict[str, torch.Tensor]:
    """The dequantised packed weights as ``[E, ...]`` (zeros for experts not owned)."""
    out = {}
    for name, t in amx.dequantized().items():
        full = torch.zeros((E,) + tuple(t.shape[1:]))
        full[list(amx.spec.owned_ids)] = t
        out[name] = full
    return out


def build(W, options, owned=None):
    H, I = W["gate"].shape[2], W["gate"].shape[1]
    spec = ExpertsSpec(E, H, I, K, owned=owned)
    amx = AmxExperts(spec, "cpu", options)
    amx.load_weights(W)
    return spec, amx


# ------------------------------------------------------------------------------ topology


def test_parse_cpulist():
    assert numa.parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert numa.parse_cpulist("") == ()


def test_simulated_topologies(monkeypatch):
    allowed = numa.allowed_cpus()
    two = numa.read_topology("2")
    assert two.n_nodes == 2 and two.simulated and two.mbind_node(0) == -1
    assert sorted(set(two.nodes[0] + two.nodes[1])) == list(allowed)
    assert numa.read_topology("0-7;8-15").nodes == (tuple(range(8)), tuple(range(8, 16)))
    assert numa.read_topology("off").n_nodes == 1
    monkeypatch.setenv("KT_AMX_NUMA", "3")
    assert numa.read_topology().n_nodes == 3
    with pytest.raises(ValueError, match="KT_AMX_NUMA"):
        numa.read_topology("a-b")


def test_sysfs_topology(monkeypatch):
    monkeypatch.delenv("KT_AMX_NUMA", raising=False)
    topo = numa.read_topology()
    assert not topo.simulated and topo.n_nodes >= 1
    assert set().union(*map(set, topo.nodes)) <= set(numa.allowed_cpus())


def test_split_evenly_and_pool_cpus():
    assert numa.split_evenly((0, 1, 2, 3, 4), 2) == ((0, 1), (2, 3, 4))
    assert numa.split_evenly((0, 1), 3) == ((0,), (1,), (0,))
    topo = numa.Topology(((0, 1, 2, 3), (4, 5, 6, 7)), None)
    cpus = numa.pool_cpus(topo, 5)
    assert len(cpus) == 5 and 0 not in cpus  # the first core is left to the driving thread
    assert numa.worker_nodes(topo, 5, lambda w: cpus[w]) == [0, 0, 1, 1, 1]
    assert numa.worker_nodes(topo, 4, lambda w: -1) == [0, 0, 1, 1]  # unpinned: blocks


def test_split_bounds_and_fallback(caplog):
    assert split_bounds(160, 2, 32) == ((0, 64), (64, 160))
    assert split_bounds(160, 3, 32) == ((0, 32), (32, 96), (96, 160))
    topo3 = numa.Topology(((0,), (1,), (2,)), None)
    fmt = LayerFormat("int4", 64, symmetric=True)
    with caplog.at_level(logging.INFO, logger="kt_amx"):
        plan = make_plan("split", topo3, fmt, 128)  # 2 groups of 64: 2 of 3 nodes
    assert plan.bounds == ((0, 64), (64, 128))
    assert any("2 of 3 NUMA nodes" in r.getMessage() for r in caplog.records)
    assert make_plan("split", topo3, fmt, 64) is None  # one group: one piece
    assert make_plan("off", topo3, fmt, 1024) is None
    assert make_plan("mirror", topo3, fmt, 64).bounds == ((0, 64),) * 3


def test_bad_option():
    with pytest.raises(BackendError, match="numa"):
        AmxExperts(ExpertsSpec(E, 96, 160, K), "cpu", {"numa": "interleave"})


# -------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("owned", list(OWNED))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("mode", ["split", "mirror"])
@pytest.mark.parametrize("nodes", ["2", "3"])
def test_parity(monkeypatch, nodes, mode, fmt, owned):
    monkeypatch.setenv("KT_AMX_NUMA", nodes)
    options, (H, I) = FORMATS[fmt]
    W = weights(H, I, seed=int(nodes))
    spec, amx = build(W, {**options, "numa": mode}, OWNED[owned])
    assert amx.plan is not None and amx.plan.mode == mode and amx.plan.n_parts == int(nodes)
    ref = TorchExperts(spec, "cpu", {"dtype": "fp32"})
    ref.load_weights(all_experts(amx))
    for T in TOKENS:
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        ids, w = routing(T, seed=T)
        for isa in _lib.isas_here():
            with _lib.use_isa(isa):
                y = amx(x, ids, w)
            assert y.shape == (T, H) and torch.isfinite(y).all()
            assert rel(y, reference.forward(amx, x, ids, w, isa)) < 2e-3, (T, isa)
            assert rel(y, ref(x, ids, w)) < (1e-2 if fmt == "bf16" else 3e-2), (T, isa)


@pytest.mark.parametrize("fmt", ["bf16", "int4-g32", "int8-channel"])
def test_split_equals_whole_layer(monkeypatch, fmt):
    """The split layer holds the same bytes as the whole one (memory not doubled), the same
    weights, and its output agrees with the unsplit layer up to the per-part rounding of h."""
    options, (H, I) = FORMATS[fmt]
    W = weights(H, I, seed=5)
    monkeypatch.setenv("KT_AMX_NUMA", "off")
    _, whole = build(W, options)
    monkeypatch.setenv("KT_AMX_NUMA", "2")
    _, split = build(W, options)
    _, mirror = build(W, {**options, "numa": "mirror"})
    # weights once; only per-channel down scales (one per row, all of I) exist on each node
    codes = sum(p.w.numel() * p.w.element_size() for part in split.parts for p in part.values())
    assert codes == sum(p.w.numel() * p.w.element_size() for p in whole.parts[0].values()) and not split.packed
    assert whole.packed_bytes() <= split.packed_bytes() <= 1.01 * whole.packed_bytes()
    assert mirror.packed_bytes() == 2 * whole.packed_bytes()
    for name, t in whole.dequantized().items():
        assert torch.equal(split.dequantized()[name], t)
    x = torch.randn(16, H)
    ids, w = routing(16, seed=1)
    assert rel(split(x, ids, w), whole(x, ids, w)) < (1e-5 if fmt == "bf16" else 2e-2)
    assert rel(mirror(x, ids, w), whole(x, ids, w)) < 1e-6  # the same sums, grouped by node
    assert torch.equal(split(x, ids, w), split(x, ids, w))  # deterministic sum of the parts
    assert torch.equal(mirror(x, ids, w), mirror(x, ids, w))


@pytest.mark.parametrize("mode", ["split", "mirror"])
def test_async_job(monkeypatch, mode):
    monkeypatch.setenv("KT_AMX_NUMA", "3")
    options, (H, I) = FORMATS["int4-g32"]
    _, amx = build(weights(H, I, seed=9), {**options, "numa": mode}, owned=(0, 3, 4, 6))
    for T in (1, 5):
        x = torch.randn(T, H).bfloat16()
        ids, w = routing(T, seed=T)
        job = amx.make_job(x, ids.int(), w)
        job.submit()
        y = job.wait().clone()
        assert torch.equal(y, amx(x, ids, w))
        assert rel(y, reference.forward(amx, x, ids, w, _lib.selected_isa())) < 1e-2
        x.mul_(-1.0)  # the job reads its buffers at submit
        job.submit()
        assert torch.equal(job.wait(), amx(x, ids, w))


def test_bad_ids_raise_through_parts(monkeypatch):
    monkeypatch.setenv("KT_AMX_NUMA", "2")
    options, (H, I) = FORMATS["bf16"]
    _, amx = build(weights(H, I), options)
    ids, w = routing(3, seed=0)
    ids[2, 0] = E + 3
    with pytest.raises(IndexError, match="topk_ids"):
        amx(torch.randn(3, H), ids, w)


def test_recreate_after_split(monkeypatch):
    """A split layer re-created on one node reassembles its packed weights exactly."""
    monkeypatch.setenv("KT_AMX_NUMA", "3")
    options, (H, I) = FORMATS["int4-sym-g64"]
    _, amx = build(weights(H, I), options)
    before = amx.dequantized()
    monkeypatch.setenv("KT_AMX_NUMA", "off")
    amx._create_layer()
    assert amx.plan is None and all(torch.equal(amx.dequantized()[n], t) for n, t in before.items())


@pytest.mark.parametrize(("nodes", "mode"), [("2", "split"), ("3", "split"), ("3", "mirror")])
def test_fresh_process_with_workers_per_node(nodes, mode):
    """Several pinned workers per simulated node (a pool started under KT_AMX_NUMA)."""
    env = {**os.environ, "KT_AMX_NUMA": nodes, "KT_AMX_THREADS": str(2 * int(nodes))}
    proc = subprocess.run([sys.executable, "-m", "kt_amx.selfcheck", "--numa", mode], capture_output=True,
                          text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "MISMATCH" not in log, log[-3000:]
