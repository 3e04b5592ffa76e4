"""``kt demo``: a tiny synthetic model through a rule file, checked against transformers."""

from __future__ import annotations

import argparse
import json
import sys

from ktcore.models.presets import ARCHITECTURES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a tiny random model through a rule file and compare it with transformers")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="deepseek_v3")
    parser.add_argument("--rules", help="rule file or shipped rule name (default: <arch>-cpu)")
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ktcore.demo import run_demo

    result = run_demo(args.arch, args.rules, args.prompt_len, args.max_new_tokens, args.seed)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        lines = [f"tiny {result['arch']} (random weights) placed by {result['rules']}:"]
        for p in result["placements"]:
            experts = f" experts {p['experts']}" if p["op"] == "experts" else ""
            lines.append(f"  {p['modules']}: {p['op']} on {p['backend']} @ {p['device']}{experts}")
        rel = result["max_abs_logit_diff"] / max(result["max_abs_logit"], 1e-30)
        lines.append(f"logits vs transformers: max abs diff {result['max_abs_logit_diff']:.3g} "
                     f"({rel:.2g} of the largest logit)")
        verdict = "identical to" if result["tokens_identical"] else "DIFFERENT from"
        lines.append(f"greedy tokens {result['tokens']} ({verdict} transformers)")
        t = result["timings"]
        lines.append(f"logits of {result['prompt_tokens']} tokens: {result['forward_ms']:.1f} ms; "
                     f"prefill {t['prefill_tokens_per_s']:.0f} tokens/s, decode {t['decode_tokens_per_s']:.1f} tokens/s")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0 if result["tokens_identical"] else 1
