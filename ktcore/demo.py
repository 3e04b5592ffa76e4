"""The smallest real end-to-end run: a tiny synthetic model of one family, built by
transformers with random weights, placed by a YAML rule file onto backend operators, checked
against the unmodified transformers model (logits and greedy tokens) and timed."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from ktcore.backends.registry import Registry


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation, recomputing the whole sequence each step (no KV cache)."""
    out = []
    for _ in range(new_tokens):
        logits = model(ids, use_cache=False).logits[:, -1]  # [1, vocab]
        token = logits.argmax(-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, token], dim=1)
        out.append(int(token))
    return out


def run_demo(arch: str = "deepseek_v3", rules: str | Path | None = None, prompt_len: int = 12,
             new_tokens: int = 16, seed: int = 0, registry: Registry | None = None) -> dict[str, Any]:
    """Runs the tiny ``arch`` model through the rule file (default: the family's CPU file)."""
    from transformers import AutoModelForCausalLM

    from ktcore.models.apply import apply_plan
    from ktcore.models.presets import make_config
    from ktcore.rules.explain import device_totals, rows
    from ktcore.rules.placement import ModelInventory, check_rules
    from ktcore.rules.shipped import resolve_rule_path

    registry = registry or Registry.from_entry_points()
    rule_path = resolve_rule_path(str(rules) if rules else f"{arch}-cpu")
    config = make_config(arch, "tiny")
    plan = check_rules(rule_path, registry, ModelInventory.from_config(config, f"tiny {arch}"))

    torch.manual_seed(seed)
    reference = AutoModelForCausalLM.from_config(config).eval()  # fp32, random weights
    model = apply_plan(copy.deepcopy(reference), plan, config, registry).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))

    with torch.inference_mode():
        want = reference(prompt, use_cache=False).logits[0]  # [T, vocab]
        start = time.perf_counter()
        got = model(prompt, use_cache=False).logits[0]
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = _greedy(model, prompt, new_tokens)
        generate_s = time.perf_counter() - start
        ref_tokens = _greedy(reference, prompt, new_tokens)

    table = rows(plan)
    return {
        "arch": arch,
        "rules": str(rule_path),
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
        "generate_tokens_per_s": new_tokens / generate_s,
    }
