"""GEMV bandwidth of build variants (tuning knobs of csrc/kernels.c and kern_avx512.h), side by side.

    python plugins/kt_llamafile/bench/sweep_gemv.py --threads 14 [--types Q4_K,Q8_0] [--variants a,b] [--out FILE]

Each variant is the extension built with extra compiler flags (``KT_LLAMAFILE_CFLAGS``) into a
temporary directory (``kt_llamafile._build.build_into``) and benchmarked by ``bench_gemv.py`` in
a subprocess that loads it (``KT_LLAMAFILE_KERNELS``), T = 1 only. The defaults in the sources
were chosen on a 2-vCPU Zen 4 VM; this is how to check them on a many-core host, where the
hardware prefetchers (which stop at 4 KiB pages on Intel) may need software prefetch ahead of
the weight stream. Writes JSON (``--out``, default ``bench/results/sweep-<cpu>-<threads>t.json``)
and prints GB/s and fraction of read bandwidth per variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("kt_llamafile.bench")

#: name -> extra compiler flags
VARIANTS = {
    "default": "",
    "no_prefetch": "-DKTL_PREFETCH=0",
    "pf2048_t1": "-DKTL_PREFETCH=2048",
    "pf4096_t1": "-DKTL_PREFETCH=4096",
    "pf16384_t1": "-DKTL_PREFETCH=16384",
    "pf1024_t0": "-DKTL_PREFETCH=1024 -DKTL_PREFETCH_HINT=_MM_HINT_T0",
    "pf4096_t0": "-DKTL_PREFETCH=4096 -DKTL_PREFETCH_HINT=_MM_HINT_T0",
    "pf_block": "-DKTL_PREFETCH_LINES=0",
    "rm4": "-DKTL_GEMV_RM=4",
    "items2": "-DKTL_GEMV_ITEMS=2",
    "items8": "-DKTL_GEMV_ITEMS=8",
    "items16": "-DKTL_GEMV_ITEMS=16",
}


def start_build(flags: str, into: Path) -> subprocess.Popen:
    """Builds the extension with ``flags`` into ``into`` in a child process (the builds of all
    variants run side by side); its stdout's last line is the .so path."""
    env = dict(os.environ, KT_LLAMAFILE_CFLAGS=flags)
    code = f"from kt_llamafile._build import build_into; print(build_into({str(into)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def finish_build(proc: subprocess.Popen) -> Path:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return Path(out.strip().splitlines()[-1])


def run_variant(so: Path, args, out: Path) -> dict:
    env = dict(os.environ, KT_LLAMAFILE_KERNELS=str(so), KT_LLAMAFILE_POOL="own")
    cmd = [sys.executable, str(HERE / "bench_gemv.py"), "--threads", str(args.threads), "--types", args.types,
           "--passes", str(args.passes), "--tokens", "", "--pool", "own", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--types", default="Q4_K,Q8_0,Q6_K,BF16")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    results: dict[str, dict] = {}
    host = None
    with tempfile.TemporaryDirectory(prefix="ktl-sweep-") as tmp:
        logger.info("building %d variants", len(names))
        builds = {name: start_build(VARIANTS[name], Path(tmp) / name) for name in names}
        built = {name: finish_build(proc) for name, proc in builds.items()}
        for name in names:
            logger.info("variant %s (%r)", name, VARIANTS[name])
            r = run_variant(built[name], args, Path(tmp) / f"{name}.json")
            host = host or r["host"]
            results[name] = {"cflags": VARIANTS[name], "read_bandwidth_gbs": r["read_bandwidth_gbs"],
                             "gemv_t1": r["gemv_t1"]}
    types = args.types.split(",")
    print(f"{'variant':12s} " + " ".join(f"{q + ' ' + s:>22s}" for q in types for s in ("gate_up", "down")))
    for name, r in results.items():
        cells = []
        for q in types:
            for s in ("gate_up", "down"):
                g = r["gemv_t1"][q][s]
                cells.append(f"{g['gbs']:8.1f} {g['fraction']:5.2f}/{g['fraction_paired']:4.2f}")
        print(f"{name:12s} " + " ".join(f"{c:>22s}" for c in cells))
    sys.path.insert(0, str(HERE))
    from bench_gemv import cpu_tag

    out = args.out or HERE / "results" / f"sweep-{cpu_tag()}-{args.threads}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"host": host, "threads": args.threads, "variants": results,
               "columns": "GB/s, fraction of the run's read bandwidth / paired fraction",
               "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
