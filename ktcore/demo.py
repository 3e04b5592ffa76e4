"""The smallest real end-to-end run: a tiny synthetic model of one family, built by
transformers with random weights, loaded into ktcore's runtime with a YAML rule file,
checked against the unmodified transformers model (logits and greedy tokens) and timed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ktcore.backends.registry import Registry


def hf_greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' greedy continuation, recomputing the whole sequence each step."""
    ids = prompt[None]  # [1, T]
    out = []
    for _ in range(new_tokens):
        token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, token], dim=1)
        out.append(int(token))
    return out


def run_demo(arch: str = "deepseek_v3", rules: str | Path | None = None, prompt_len: int = 12,
             new_tokens: int = 16, seed: int = 0, registry: Registry | None = None) -> dict[str, Any]:
    """Runs the tiny ``arch`` model through the rule file (default: the family's CPU file)."""
    from transformers import AutoModelForCausalLM

    import ktcore
    from ktcore.formats.state_dict_store import StateDictStore
    from ktcore.models.presets import make_config
    from ktcore.rules.explain import device_totals, rows

    config = make_config(arch, "tiny")
    torch.manual_seed(seed)
    reference = AutoModelForCausalLM.from_config(config).eval()  # fp32, random weights
    model = ktcore.load(store=StateDictStore(reference, f"tiny {arch}"), config=config,
                        rules=rules or f"{arch}-cpu", dtype="fp32", registry=registry,
                        max_seq_len=prompt_len + new_tokens)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,))

    with torch.inference_mode():
        want = reference(prompt[None], use_cache=False).logits[0]  # [T, vocab]
        start = time.perf_counter()
        got = model.logits(prompt)
        forward_s = time.perf_counter() - start
        tokens = model.generate(prompt, new_tokens, stop_ids=[])
        ref_tokens = hf_greedy(reference, prompt, new_tokens)

    table = rows(model.plan)
    return {
        "arch": arch,
        "rules": str(model.plan.rules.file),
        "placements": [
            {"modules": r.module, "op": r.op, "backend": r.backend, "device": r.device,
             "experts": r.experts_text} for r in table if r.op is not None
        ],
        "bytes_per_device": device_totals(table),
        "prompt_tokens": prompt_len,
        "max_abs_logit_diff": float((got - want).abs().max()),
        "max_abs_logit": float(want.abs().max()),
        "tokens": tokens,
        "reference_tokens": ref_tokens,
        "tokens_identical": tokens == ref_tokens,
        "forward_ms": forward_s * 1e3,
        "timings": model.timings.as_dict(),
    }
