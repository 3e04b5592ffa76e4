"""GEMV bandwidth and batched throughput of kt-llamafile's kernels, per GGUF type.

    python plugins/kt_llamafile/bench/bench_gemv.py [--threads N] [--types Q4_K,Q8_0] [--out FILE]
        [--pool own|shared]

- Ceiling: the host's read bandwidth, measured in the same run with the same worker pool (a
  sum of 64-bit words over a buffer of several times the last-level cache), best of a few
  passes before and after the GEMV runs (the larger is used: ``fraction``); and a pass of the
  same sum over the very matrices of the GEMV right before each GEMV pass
  (``fraction_paired``: median over passes of GEMV GB/s over that sample: same bytes, same
  pages, and robust to load that drifts on a shared host).
- GEMV (T = 1): DeepSeek-V3 expert shapes, gate/up [2048, 7168] and down [7168, 2048], as a
  set of copies whose total size is several times the last-level cache, cycled through, so
  every weight byte comes from DRAM. GB/s = weight bytes / time; fraction = GB/s / ceiling.
  The GEMV is called straight through the C entry point, as the probe is (``gbs_python``: the
  same passes through the torch wrapper ``_lib.matmul``, which adds its own per-call cost).
- Diagnostics: ``compute_1t_gbs``, one thread's GB/s on a cache-resident part of each shape
  (compute cost per byte); ``pool_run_overhead_us``, a pool run with almost no work.
- Batched (T = 64, 512): tokens/s and GFLOP/s on one [2048, 7168] matrix.

- Pool: ``--pool own`` (default) runs on kt-llamafile's own pool of ``--threads`` threads;
  ``--pool shared`` on kt-amx's shared pool (its size: ``KT_AMX_THREADS``, set to ``--threads``
  here unless already set), as a process with both backends does.

Writes JSON (default ``bench/results/<cpu>-<threads>t.json`` beside this script) and prints a table.
Timings are best-of-passes wall time; on a shared host, run it when the CPUs are idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kt_llamafile import _lib
from kt_llamafile.qtypes import QTYPES, row_bytes
from kt_llamafile.random_blocks import random_weight

SHAPES = {"gate_up": (2048, 7168), "down": (7168, 2048)}  # [rows N, row length K]
BATCH_SHAPE = (2048, 7168)


def cpuinfo(field: str) -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_tag() -> str:
    """File name of this CPU's results: model name, family and model numbers."""
    tag = slug(cpu_name())
    family, model = cpuinfo("cpu family"), cpuinfo("model")
    return f"{tag}-f{family}m{model}" if family and model else tag


def llc_bytes() -> int:
    """Size of the largest cache of CPU 0 (sysfs), 32 MiB if unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return best or 32 << 20


class ReadProbe:
    """Host read bandwidth with the kernels' pool: a sum of 64-bit words over a buffer."""

    def __init__(self, threads: int, nbytes: int):
        self.lib = _lib.kernels()[1]
        self.pool = _lib.pool(threads)
        self.buf = torch.ones(nbytes, dtype=torch.uint8)

    def once(self, bufs: list[torch.Tensor] | None = None) -> float:
        """GB/s of one pass over ``bufs`` (default: the probe's own buffer)."""
        bufs = [self.buf] if bufs is None else bufs
        t0 = time.perf_counter()
        for b in bufs:
            self.lib.ktl_read_sum(self.pool, _lib.ptr(b), b.numel())
        return sum(b.numel() for b in bufs) / (time.perf_counter() - t0) / 1e9

    def best(self, passes: int = 5) -> float:
        return max(self.once() for _ in range(passes))


def gemv(qtype: str, shape: tuple[int, int], threads: int, total_bytes: int, rng, passes: int,
         probe: ReadProbe) -> dict:
    """Each pass cycles once through the copies, right after a pass of the read probe over the
    very same copies; the pass's fraction is its GB/s over that sample (paired: same bytes,
    same pages, and drifting load on a shared host affects both alike). The GEMV is called as
    the probe is, straight through the C entry point (``ktl_matmul``, x and y allocated once);
    ``gbs_python`` is the same pass through ``_lib.matmul`` (the torch wrapper, which adds its
    own per-call cost: the figure of sessions 3-5)."""
    n, k = shape
    first = torch.from_numpy(random_weight(qtype, n, k, rng))
    copies = max(2, -(-total_bytes // first.numel()))
    mats = [first] + [first.clone() for _ in range(copies - 1)]
    x = torch.randn(1, k)
    y = torch.empty(1, n)
    lib, handle, qid = _lib.kernels()[1], _lib.pool(threads), _lib.QTYPE_IDS[qtype]
    calls = [(handle, qid, _lib.ptr(w), n, k, _lib.ptr(x, "float *"), 1, _lib.ptr(y, "float *")) for w in mats]
    _lib.check(lib.ktl_matmul(*calls[0]), "matmul")  # warm-up (pool start, allocations)
    runs, py = [], []
    for _ in range(passes):
        bw = probe.once(mats)
        t0 = time.perf_counter()
        for c in calls:
            lib.ktl_matmul(*c)
        dt = (time.perf_counter() - t0) / copies
        runs.append((first.numel() / dt / 1e9, bw, dt))
        t0 = time.perf_counter()
        for w in mats:
            _lib.matmul(x, w, qtype, n, threads)
        py.append(first.numel() / ((time.perf_counter() - t0) / copies) / 1e9)
    best = max(runs)
    return {"gbs": best[0], "ms": best[2] * 1e3, "read_gbs_paired": best[1],
            "fraction_paired": float(np.median([g / b for g, b, _ in runs])), "gbs_python": max(py),
            "bytes": first.numel(), "copies": copies}


def compute_1t(qtype: str, shape: tuple[int, int], rng, seconds: float = 0.3) -> float:
    """GB/s of one thread on a cache-resident part of ``shape`` (at most 1 MiB of rows): the
    kernel's compute cost per byte, with no DRAM traffic."""
    n, k = shape
    rows = max(4, min(n, (1 << 20) // row_bytes(qtype, k)) // 4 * 4)
    w = torch.from_numpy(random_weight(qtype, rows, k, rng))
    x, y = torch.randn(1, k), torch.empty(1, rows)
    lib = _lib.kernels()[1]
    one = lib.ktl_pool_create(1, 0)  # a pool of the calling thread alone, whatever --pool says
    args = (one, _lib.QTYPE_IDS[qtype], _lib.ptr(w), rows, k, _lib.ptr(x, "float *"), 1, _lib.ptr(y, "float *"))
    best, reps = 0.0, max(10, int(2e8 / w.numel()))
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(reps):
            lib.ktl_matmul(*args)
        best = max(best, w.numel() * reps / (time.perf_counter() - t0) / 1e9)
    lib.ktl_pool_destroy(one)
    return best


def pool_overhead_us(threads: int, reps: int = 2000) -> float:
    """Median µs of a pool run with almost no work (the read probe over 4 KiB per item):
    waking the workers, the item counter and the join."""
    lib, handle = _lib.kernels()[1], _lib.pool(threads)
    buf = torch.ones(4096 * 4 * threads, dtype=torch.uint8)
    p, nb = _lib.ptr(buf), buf.numel()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        lib.ktl_read_sum(handle, p, nb)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def batched(qtype: str, tokens: int, threads: int, rng, passes: int) -> dict:
    n, k = BATCH_SHAPE
    w = torch.from_numpy(random_weight(qtype, n, k, rng))
    x = torch.randn(tokens, k)
    _lib.matmul(x, w, qtype, n, threads)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        _lib.matmul(x, w, qtype, n, threads)
        best = min(best, time.perf_counter() - t0)
    return {"ms": best * 1e3, "tokens_per_s": tokens / best, "gflops": 2 * n * k * tokens / best / 1e9}


def select_pool(mode: str, threads: int) -> dict:
    """Chooses the pool before its first use (KT_LLAMAFILE_POOL; KT_AMX_THREADS for shared)."""
    from kt_llamafile import pools

    os.environ[pools.POOL_ENV] = mode
    if mode == "shared":
        os.environ.setdefault("KT_AMX_THREADS", str(threads))
    pools.shared_pool.cache_clear()
    handle = pools.pool(threads)
    return {"mode": mode, "external": bool(_lib.kernels()[1].ktl_pool_is_external(handle)),
            "threads": pools.pool_threads(handle)}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=_lib.default_threads())
    parser.add_argument("--types", default=",".join(QTYPES))
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--tokens", default="64,512")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pool", choices=("own", "shared"), default="own")
    args = parser.parse_args(argv)
    pool_info = select_pool(args.pool, args.threads)
    types = [t for t in args.types.split(",") if t]
    rng = np.random.default_rng(0)
    llc = llc_bytes()
    total = max(4 * llc, 256 << 20)

    probe = ReadProbe(args.threads, max(4 * llc, 512 << 20))
    bw_before = probe.best()
    gemv_results: dict[str, dict] = {}
    for qtype in types:
        gemv_results[qtype] = {name: gemv(qtype, shape, args.threads, total, rng, args.passes, probe)
                               for name, shape in SHAPES.items()}
    bw_after = probe.best()
    overhead = pool_overhead_us(args.threads)
    compute = {q: {name: compute_1t(q, shape, rng) for name, shape in SHAPES.items()} for q in types}
    ceiling = max(bw_before, bw_after)
    for per_shape in gemv_results.values():
        for r in per_shape.values():
            r["fraction"] = r["gbs"] / ceiling
    batch_results = {q: {str(t): batched(q, int(t), args.threads, rng, max(2, args.passes // 2))
                         for t in args.tokens.split(",") if t} for q in types}

    result = {
        "host": {"cpu": cpu_name(), "family": cpuinfo("cpu family"), "model": cpuinfo("model"),
                 "flags_avx512": sorted(f for f in (cpuinfo("flags") or "").split() if f.startswith("avx512")),
                 "hypervisor": "hypervisor" in (cpuinfo("flags") or "").split(), "logical_cpus": os.cpu_count(), "physical_cores": _lib.physical_cores(),
                 "llc_bytes": llc, "isa": _lib.selected_isa(), "isa_available": _lib.available_isa(),
                 "python": sys.version.split()[0], "torch": torch.__version__},
        "threads": args.threads,
        "pool": pool_info,
        "read_bandwidth_gbs": {"before": bw_before, "after": bw_after, "ceiling": ceiling},
        "gemv_t1": gemv_results,
        "pool_run_overhead_us": overhead,
        "compute_1t_gbs": compute,
        "batched": batch_results,
        "method": {"gemv_shapes": SHAPES, "gemv_set_bytes": total, "batched_shape": BATCH_SHAPE,
                   "gemv_call": "ktl_matmul through cffi (gbs_python: through _lib.matmul)",
                   "timing": f"best of {args.passes} passes, wall clock; fraction_paired: median of per-pass ratios"},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{cpu_name()}  isa={_lib.selected_isa()}  threads={args.threads}  "
          f"read bandwidth {bw_before:.1f} / {bw_after:.1f} GB/s (before / after)")
    print(f"pool run overhead {overhead:.1f} us")
    print(f"{'type':6s} {'gate_up GB/s':>13s} {'frac':>5s} {'pair':>5s} {'py':>6s} {'1t':>5s} "
          f"{'down GB/s':>10s} {'frac':>5s} {'pair':>5s} {'py':>6s} {'1t':>5s} " +
          " ".join(f"{'T=' + t + ' tok/s':>13s}" for t in args.tokens.split(",") if t))
    for q in types:
        g, d = gemv_results[q]["gate_up"], gemv_results[q]["down"]
        toks = " ".join(f"{r['tokens_per_s']:13.0f}" for r in batch_results[q].values())
        c = compute[q]
        print(f"{q:6s} {g['gbs']:13.1f} {g['fraction']:5.2f} {g['fraction_paired']:5.2f} {g['gbs_python']:6.1f} "
              f"{c['gate_up']:5.1f} {d['gbs']:10.1f} {d['fraction']:5.2f} {d['fraction_paired']:5.2f} "
              f"{d['gbs_python']:6.1f} {c['down']:5.1f} {toks}")
    out = args.out or Path(__file__).resolve().parent / "results" / f"{cpu_tag()}-{args.threads}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
