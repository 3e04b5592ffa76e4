"""``kt make-model``: write a deterministic synthetic model (HF directory and GGUF files)."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ktcore.errors import KtError
from ktcore.models.presets import ARCHITECTURES, preset_names

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-model", help="write a synthetic model (random weights, real tokenizer and file formats)",
        description="Writes OUTDIR as an HF model directory (config, tokenizer, safetensors) with "
                    "deterministic random weights, and OUTDIR/<name>-<TYPE>.gguf per --gguf-types.")
    parser.add_argument("arch", metavar="ARCH", choices=ARCHITECTURES,
                        help=f"architecture: {', '.join(ARCHITECTURES)}")
    parser.add_argument("outdir", metavar="OUTDIR", help="output directory (created)")
    parser.add_argument("--preset", default="tiny", choices=preset_names(),
                        help="model dimensions (default: tiny; full-size presets belong to one ARCH)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="checkpoint dtype (default: bf16)")
    parser.add_argument("--gguf-types", default="", metavar="TYPES",
                        help="comma-separated GGUF types to write, e.g. F32,Q8_0,Q4_K")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("--layers", type=int, metavar="N", help="override num_hidden_layers")
    parser.add_argument("--no-safetensors", action="store_true",
                        help="write config and tokenizer but no safetensors weights (for use with a GGUF)")
    parser.add_argument("--shard-size", default="2GiB", metavar="SIZE",
                        help="maximum safetensors shard size, e.g. 500MB, 2GiB (default: 2GiB)")
    parser.add_argument("--gguf-split-size", metavar="SIZE",
                        help="split each GGUF into parts of at most SIZE (llama.cpp split files)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def parse_size(text: str) -> int:
    """``500M``, ``2GiB``, ``1.5G``, ``12345`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise KtError(f"invalid size {text!r}; use e.g. 500MB, 2GiB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise KtError(f"size must be positive, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from ktcore.models.make_model import MakeModelSpec, make_model

    types = tuple(t.strip().upper() for t in args.gguf_types.split(",") if t.strip())
    spec = MakeModelSpec(args.arch, args.preset, args.dtype, types, args.seed, args.layers)  # validates first
    made = make_model(spec, args.outdir, safetensors=not args.no_safetensors,
                      shard_bytes=parse_size(args.shard_size),
                      gguf_split_bytes=parse_size(args.gguf_split_size) if args.gguf_split_size else None)
    if args.json:
        out = {
            "name": spec.name, "arch": spec.arch, "preset": spec.preset, "dtype": spec.dtype,
            "seed": spec.seed, "parameters": made.parameters, "weight_bytes": made.nbytes,
            "outdir": str(made.outdir), "hf_files": [str(p) for p in made.hf_files],
            "gguf_files": {qtype: [str(p) for p in parts] for qtype, parts in made.gguf_files},
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    count = f"{made.parameters / 1e9:.2f}B" if made.parameters >= 1e9 else f"{made.parameters / 1e6:.2f}M"
    lines = [f"{spec.name}: {count} parameters ({spec.dtype}, seed {spec.seed}) -> {made.outdir}"]
    lines += [f"  {p.name}" for p in made.hf_files]
    lines += [f"  {p.name}  ({qtype})" for qtype, parts in made.gguf_files for p in parts]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
