"""``kt generate``: load a model (HF directory, GGUF, or both) and continue a prompt.

Without ``--model`` and ``--gguf`` it runs ktcore's default model, a tiny DeepSeek-V3-shaped
model with random weights and a real tokenizer that ``kt make-model`` generates on first use
and caches, so the command works on a fresh machine with nothing downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a prompt")
    parser.add_argument("--model", help="HF model directory (config, tokenizer; safetensors unless --gguf)")
    parser.add_argument("--gguf", help="GGUF file (the first part of a split set); alone, config and tokenizer come from it")
    parser.add_argument("--rules", help="rule file or shipped rule name (default: the family's file for this host)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="compute dtype (default fp32)")
    parser.add_argument("--max-seq-len", type=int, help="cache length (default: min(model maximum, 4096))")
    parser.add_argument("--experts-per-token", type=int,
                        help="routed experts per token, fewer than the config's for speed (weights renormalised as configured)")
    parser.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile(fullgraph=True)")
    parser.add_argument("--stream-min-tokens", type=int, metavar="N",
                        help="prefill chunks of at least N tokens stream the CPU experts' weights to the GPU and "
                             "compute there (0: never; default 128)")
    parser.add_argument("--json", action="store_true", help="print text, token ids, prompt length and timings as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ktcore
    from ktcore.errors import KtError

    model_path = args.model
    if model_path is None and args.gguf is None:
        from ktcore.models.default_model import default_model_dir

        model_path = default_model_dir()
    model = ktcore.load(model_path, gguf=args.gguf, rules=args.rules, dtype=args.dtype,
                        max_seq_len=args.max_seq_len, progress=not args.json,
                        experts_per_token=args.experts_per_token, compile=args.compile,
                        **({} if args.stream_min_tokens is None else {"stream_min_tokens": args.stream_min_tokens}))
    if model.tokenizer is None:
        raise KtError(f"{model_path or args.gguf}: no tokenizer, so the prompt cannot be encoded")
    prompt_ids = model.tokenizer.encode(args.prompt, add_special_tokens=False)
    if model.tokenizer.bos_token_id is not None:
        prompt_ids = [model.tokenizer.bos_token_id] + prompt_ids
    tokens = model.generate(prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    timings = model.timings.as_dict()
    if args.json:
        doc = {"text": text, "token_ids": tokens, "prompt_tokens": len(prompt_ids), "timings": timings,
               "model": str(model_path or args.gguf), "rules": str(model.plan.rules.file)}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(args.prompt + text + "\n")
        sys.stderr.write(f"[{len(prompt_ids)} prompt tokens: prefill {timings['prefill_tokens_per_s'] or 0:.1f} tokens/s; "
                         f"{timings['decode_tokens']} more tokens: decode {timings['decode_tokens_per_s'] or 0:.1f} tokens/s; "
                         f"rules {model.plan.rules.file}]\n")
    return 0
