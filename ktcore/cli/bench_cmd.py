"""``kt bench``: the runtime's benchmarks on full-size-shaped random models (see
ktcore.runtime.benchmark). ``kt bench`` alone runs every case; results go to ``--out`` as
JSON and Markdown. GGUF cases write their model file once into ``--gguf-dir``
(ktcore.runtime.bench_gguf) and reuse it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    from ktcore.runtime.benchmark import CASES

    parser = subparsers.add_parser("bench", help="prefill/decode benchmarks on full-size-shaped random models")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="case to run (repeatable; default all)")
    parser.add_argument("--layers", type=int, help="cut every case to its first N layers")
    parser.add_argument("--rules", help="rule file instead of the case's own")
    parser.add_argument("--prompt-lengths", help="comma-separated prompt lengths (default 512,4096)")
    parser.add_argument("--decode-tokens", type=int, help="tokens per decode measurement (default 64)")
    parser.add_argument("--out", help="directory for results.json and results.md")
    parser.add_argument("--gguf-dir", help="where the GGUF cases (*-gguf) keep their random Q4_K_M model file, "
                        "written on first use and reused (about 5 GB for qwen3-30b-a3b-12l-gguf); "
                        "default $KTCORE_CACHE/bench, i.e. ~/.cache/ktcore/bench")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ktcore.runtime.benchmark import CASES, markdown, run_case

    overrides = {}
    if args.layers:
        overrides["layers"] = args.layers
    if args.rules:
        overrides["rules"] = args.rules
    if args.prompt_lengths:
        overrides["prompt_lengths"] = tuple(int(v) for v in args.prompt_lengths.split(","))
    if args.decode_tokens:
        overrides["decode_tokens"] = args.decode_tokens
    results = []
    for name in args.case or sorted(CASES):
        case = dataclasses.replace(CASES[name], **overrides)
        results.append(run_case(case, gguf_dir=args.gguf_dir))  # reads the host bandwidth around its decode
    table = markdown(results)
    sys.stdout.write(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
        (out / "results.md").write_text(table)
    return 0
