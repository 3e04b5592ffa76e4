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
                  "| case | BLOCK_M / N / K up / K down | warps / stages | ms | of copy |",
                  "| --- | --- | --- | ---: | ---: |"]
        for case in dict.fromkeys(d["case"] for d in sweep):
            timed = (d for d in sweep if d["case"] == case and "ms" in d)  # failed tiles carry "error"
            for d in sorted(timed, key=lambda d: d["ms"])[:3]:
                c = d["config"]
                lines.append(f"| {case} | {c['BLOCK_M']} / {c['BLOCK_N']} / {c['BLOCK_K_UP']} / {c['BLOCK_K_DOWN']} "
                             f"| {c['num_warps']} / {c.get('num_stages', '-')} | {d['ms']:.3f} | "
                             f"{d['fraction_of_copy']:.2f} |")
    return "\n".join(lines) + "\n"


def render(r: dict) -> str:
    r = json.loads(json.dumps(r))  # token keys as strings, as read back from the JSON
    if "experts" in r:
        return render_experts(r)
    copy = r["hbm_copy"]["GBps"]
    rows = r.get("int4", [])
    stream = max([copy] + [g for row in rows for g in row["bf16_GBps"].values()])
    tokens = list(rows[0]["int4_us"]) if rows else []
    lines = [f"# kt-marlin linear on {r['device']} (torch {r['torch']}, triton {r['triton']})", "",
             f"Ceilings measured in this run: copy {copy:.0f} GB/s (1 GiB device copy, read + write); "
             f"stream {stream:.0f} GB/s (fastest weight read of bf16 `F.linear` in this run).", "",
             f"## int4 (group {r.get('group', 128)}) vs bf16 `F.linear`, T = {' / '.join(tokens)}", "",
             "GB/s: packed int4 bytes (weights + fp16 scales and offsets) per second; of copy: that over "
             "the copy ceiling; speed-up: bf16 time / int4 time.", "",
             "| model | projection | N | K | int4 µs | int4 GB/s | of copy | bf16 µs | speed-up vs bf16 "
             "| int4 µs without PDL |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]

    def per_t(row, key, fmt):
        return " / ".join(format(row[key][t], fmt) for t in tokens) if key in row else "-"

    for row in rows:
        lines.append(f"| {row['model']} | {row['proj']} | {row['N']} | {row['K']} | {per_t(row, 'int4_us', '.1f')} | "
                     f"{per_t(row, 'int4_GBps', '.0f')} | {per_t(row, 'int4_fraction_of_copy', '.2f')} | "
                     f"{per_t(row, 'bf16_us', '.1f')} | {per_t(row, 'speedup_vs_bf16', '.2f')} | "
                     f"{per_t(row, 'int4_no_pdl_us', '.1f')} |")
    if "skipped_after" in r:
        lines += ["", f"Skipped from {r['skipped_after']}."]
    lines += ["", "Each int4 / bf16 timing replays a CUDA graph of one call per distinct weight copy, at least "
              "512 MB streamed per graph (or one copy when larger), so the weights come from HBM. With PDL "
              "(programmatic dependent launch) each int4 call starts while the previous call of the graph "
              "finishes and has the L2 fetch its first weight tiles meanwhile; \"without PDL\" is the same "
              "config launched plainly (it starts when the previous kernel has finished)."]
    if not r.get("dequant_bf16"):
        return "\n".join(lines) + "\n"
    lines += ["", "## GGUF dequantisation to bf16 (7168 x 7168)", "",
              "| type | µs | GB/s (read + write) | of copy | of stream |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in r.get("dequant_bf16", []):
        lines.append(f"| {row['qtype']} | {row['seconds'] * 1e6:.1f} | {row['GBps']:.0f} | "
                     f"{row['GBps'] / copy:.2f} | {row['GBps'] / stream:.2f} |")
    lines += ["", "Notes: each dequantisation graph calls the kernel four times on one GGUF tensor of "
              "13-54 MB, so part of its input can be served from the 50 MB L2: read its fractions as upper bounds."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(render(json.load(f)))
