"""Renders a ``bench_linear.py`` JSON result as a Markdown table.

Two ceilings, both measured in the same run: ``copy`` (a 1 GiB device-to-device copy, bytes
read + written per second) and ``stream``, the fastest weight stream any timed kernel
reached (in practice torch's bf16 ``F.linear`` at 1 token on the largest shape), which is
the better estimate of attainable read bandwidth when the copy underperforms.

Usage: ``python report.py RESULT.json > RESULT.md``.
"""

from __future__ import annotations

import json
import sys


def render(r: dict) -> str:
    copy = r["hbm_copy"]["GBps"]
    stream = max([copy] + [row["bf16_t1_fraction_of_copy"] * copy for row in r.get("int4", [])])
    lines = [f"# kt-marlin linear and dequant on {r['device']} (torch {r['torch']}, triton {r['triton']})", "",
             f"Ceilings measured in this run: copy {copy:.0f} GB/s (1 GiB device copy, read + write); "
             f"stream {stream:.0f} GB/s (fastest weight read of any timed kernel: bf16 `F.linear`, 1 token).", "",
             "## int4 GEMV (1 token, group 128) and int4 vs bf16 `F.linear`", "",
             "| model | projection | N | K | int4 µs | GB/s | of copy | of stream | bf16 µs | speed-up vs bf16 at T=1 / 2 / 4 / 8 / 16 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in r.get("int4", []):
        gbps = row["gemv_t1_GBps"]
        sp = " / ".join(f"{row['speedup_vs_bf16'][t]:.2f}" for t in ("1", "2", "4", "8", "16"))
        lines.append(f"| {row['model']} | {row['proj']} | {row['N']} | {row['K']} | {row['gemv_t1_us']:.1f} | "
                     f"{gbps:.0f} | {gbps / copy:.2f} | {gbps * 1e9 / (stream * 1e9):.2f} | "
                     f"{row['bf16_us']['1']:.1f} | {sp} |")
    lines += ["", "## GGUF dequantisation to bf16 (7168 x 7168)", "",
              "| type | µs | GB/s (read + write) | of copy | of stream |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in r.get("dequant_bf16", []):
        lines.append(f"| {row['qtype']} | {row['seconds'] * 1e6:.1f} | {row['GBps']:.0f} | "
                     f"{row['GBps'] / copy:.2f} | {row['GBps'] / stream:.2f} |")
    sweep = r.get("gemv_sweep", [])
    if sweep:
        lines += ["", "## GEMV tile sweep (best three per shape)", "",
                  "| shape | BLOCK_N | BLOCK_K | SPLIT_K | µs | of copy |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for proj in dict.fromkeys(d["proj"] for d in sweep):
            best = sorted((d for d in sweep if d["proj"] == proj), key=lambda d: d["us"])[:3]
            for d in best:
                c = d["cfg"]
                lines.append(f"| {proj} | {c['BLOCK_N']} | {c['BLOCK_K']} | {c['SPLIT_K']} | {d['us']:.1f} | "
                             f"{d['fraction_of_copy']:.2f} |")
    lines += ["", "Notes: each dequantisation graph calls the kernel four times on one GGUF tensor of "
              "13-54 MB, so part of its input can be served from the 50 MB L2; read its fractions as upper "
              "bounds. The int4 timings stream at least 512 MB of distinct weight copies per graph (or one "
              "copy when larger), so they come from HBM."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(render(json.load(f)))
