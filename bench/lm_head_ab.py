"""``lm_head`` in bf16 against kt-marlin's int8 and int4 weight-only kernels, in ``kt bench``'s
captured 12-layer Qwen3-30B-A3B decode, on the GPU host, in one process.

On the 12-layer cut the bf16 ``lm_head`` (151936 x 2048, 622 MB read per token) is a large
share of the GPU's time per token. This swaps the model's ``lm_head`` for a ``MarlinLinear``
packed from the same weight (what a rule ``{name: '^lm_head$'} -> {op: linear, backend:
marlin, options: {format: int8}}`` loads), alternates the three ``--rounds`` times with the
doorbell's per-layer split, and reports the mean KL divergence of the next-token
distributions against the bf16 ``lm_head`` over held-out tokens.

    python bench/lm_head_ab.py --source int4 --out DIR
"""
import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import torch

from ktcore.ops.linear import LinearSpec
from ktcore.runtime import benchmark
from ktcore.runtime.quality import mean_kl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experts_in_step import load  # noqa: E402


def marlin_head(head: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A kt-marlin linear of format ``fmt`` packed from ``head``'s weight, on its device."""
    from kt_marlin.linear import MarlinLinear

    weight = head.weight  # [V, H]
    op = MarlinLinear(LinearSpec(weight.shape[1], weight.shape[0]), weight.device, {"format": fmt})
    op.load_weights({"weight": weight.detach().to(torch.bfloat16).cpu()})
    return op


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("gguf", "int4"), default="int4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = load(args.source)
    bf16 = model.decoder.model.lm_head
    heads = {"bf16": bf16, "int8": marlin_head(bf16, "int8"), "int4": marlin_head(bf16, "int4")}
    held_out = torch.arange(1000, 1128)
    prompt = torch.arange(3, 35)
    result = {"source": args.source, "runs": [], "mean_kl_nats": {}}
    reference = None
    for name, head in heads.items():
        model.decoder.model.lm_head = head
        logits = model.logits(held_out)  # [T, V]
        reference = logits if reference is None else reference
        result["mean_kl_nats"][name] = mean_kl(reference, logits)
    for _ in range(args.rounds):
        for name, head in heads.items():
            model.decoder.model.lm_head = head
            model.release_graph()
            clocks: dict = {}
            rates = benchmark.decode_rates(model, prompt, 64, True, clocks)
            run = {"lm_head": name, "tokens_per_s": rates, **clocks}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    result["median_tokens_per_s"] = {
        name: statistics.median(statistics.median(r["tokens_per_s"]) for r in result["runs"] if r["lm_head"] == name)
        for name in heads}
    print(json.dumps({k: result[k] for k in ("mean_kl_nats", "median_tokens_per_s")}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lm_head_ab_{args.source}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
