"""Renders a ``bench_linear.py`` or ``bench_experts.py`` JSON result as Markdown tables.

Two ceilings, both measured in the same run: ``copy`` (a 1 GiB device-to-device copy, bytes
read + written per second) and ``stream``, the fastest weight stream any timed kernel
reached (in practice torch's bf16 ``F.linear`` at 1 token on the largest shape), which is
the better estimate of attainable read bandwidth when the copy underperforms.

Usage: ``python report.py RESULT.json > RESULT.md``.
"""

from __future__ import annotations

import json
import sys


def render_experts(r: dict) -> str:
    """``bench_experts.py``: fused MoE per layer, ms and the fraction of the copy ceiling."""
    copy = r["hbm_copy"]["GBps"]
    lines = [f"# kt-marlin fused MoE experts on {r['device']} (torch {r['torch']}, triton {r['triton']})", "",
             f"Ceiling measured in this run: copy {copy:.0f} GB/s (1 GiB device copy, read + write). Bytes are "
             "the weights (with scales) of the distinct experts the routing selects, averaged over the "
             "routings of one graph.", "",
             "| model | format | T | ms | experts read | GB/s | of copy | BLOCK_M / N / K up / K down |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in r.get("experts", []):
        c = row["config"]
        lines.append(f"| {row['model']} | {row['format']} | {row['T']} | {row['ms']:.3f} | "
                     f"{row['experts_touched']:.1f} | {row['GBps']:.0f} | {row['fraction_of_copy']:.2f} | "
                     f"{c['BLOCK_M']} / {c['BLOCK_N']} / {c['BLOCK_K_UP']} / {c['BLOCK_K_DOWN']} |")
    sweep = r.get("experts_sweep", [])
    if sweep:
        lines += ["", "## Tile sweep (best three per case)", "",
                  "| case | BLOCK_M / N / K up / K down | ms | of copy |", "| --- | --- | ---: | ---: |"]
        for case in dict.fromkeys(d["case"] for d in sweep):
            for d in sorted((d for d in sweep if d["case"] == case), key=lambda d: d["ms"])[:3]:
                c = d["config"]
                lines.append(f"| {case} | {c['BLOCK_M']} / {c['BLOCK_N']} / {c['BLOCK_K_UP']} / {c['BLOCK_K_DOWN']} "
                             f"| {d['ms']:.3f} | {d['fraction_of_copy']:.2f} |")
    return "\n".join(lines) + "\n"


def render(r: dict) -> str:
    if "experts" in r:
        return render_experts(r)
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
