"""Same-process A/B of a kt-amx pool or kernel setting in ``kt bench``'s captured decode, on
the GPU host: the 12-layer Qwen3-30B-A3B case (``--source gguf``: kt-llamafile experts on
kt-amx's pool; ``int4``: kt-amx's own experts), the setting changed between runs and the
values alternated ``--rounds`` times, each run with the doorbell's per-layer split and the
same experts timed back to back outside the step (``experts_in_step.outside_us``).

Knobs: ``spin`` (µs idle workers spin, ``kt_amx._lib.set_spin_us``), ``prefetch`` (bytes
the one-token kernels prefetch ahead in the weight stream, ``KT_AMX_PREFETCH``), ``wait`` and
``ring`` (how the stream waits for the CPU's answer and rings the doorbell,
``KTCORE_HOST_WAIT`` and ``KTCORE_HOST_RING``: ``memop`` or ``kernel``; the graph is captured
again for each run).

    python bench/knob_ab.py --source gguf --knob spin --values 50,2000
    python bench/knob_ab.py --source int4 --knob prefetch --values 4096,2048,3072
    python bench/knob_ab.py --source int4 --knob wait --values memop,kernel
    python bench/knob_ab.py --source int4 --knob ring --values memop,kernel

Writes ``knob_ab_{source}_{knob}.json`` under ``--out`` (default ``$OUT`` or ``.``).
"""
import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import torch

from kt_amx import _lib
from ktcore.runtime import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experts_in_step import load, outside_us  # noqa: E402



def capture_with(env: str):
    """A knob that sets ``env`` and drops the captured graph, so the next decode captures it
    again with that setting."""
    def set_value(model, value: str) -> None:
        os.environ[env] = value
        model.release_graph()
    return set_value


KNOBS = {
    "spin": lambda model, us: _lib.set_spin_us(us),
    "prefetch": lambda model, n: _lib.kernels()[1].kt_set_prefetch(n),
    "wait": capture_with("KTCORE_HOST_WAIT"),
    "ring": capture_with("KTCORE_HOST_RING"),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("gguf", "int4"), default="int4")
    parser.add_argument("--knob", choices=sorted(KNOBS), required=True)
    parser.add_argument("--values", required=True, help="comma-separated, e.g. 4096,2048 or memop,kernel")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    values = [int(v) if v.isdigit() else v for v in args.values.split(",")]
    model = load(args.source)
    prompt = torch.arange(3, 35)
    result = {"source": args.source, "knob": args.knob, "runs": []}
    for _ in range(args.rounds):
        for value in values:
            KNOBS[args.knob](model, value)
            benchmark.decode_rates(model, prompt, 8, True)  # settle
            clocks: dict = {}
            rates = benchmark.decode_rates(model, prompt, args.tokens, True, clocks)
            run = {args.knob: value, "tokens_per_s": rates, **clocks, "outside_us_per_layer": outside_us(model)}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    result["median_tokens_per_s"] = {
        v: statistics.median(statistics.median(r["tokens_per_s"]) for r in result["runs"] if r[args.knob] == v)
        for v in values}
    print(json.dumps(result["median_tokens_per_s"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"knob_ab_{args.source}_{args.knob}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
