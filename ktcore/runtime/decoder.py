"""The decoder forward over the built skeleton, with static per-layer caches.

``Decoder.forward(ids[B, T], positions[B, T], cache_lens[B]) -> logits[B, T, V]`` writes the
tokens' keys (or MLA latents) at ``positions`` and attends to every slot below
``cache_lens``. The caches hold ``batch`` rows, one per concurrent sequence: a decode step runs
rows ``[0, B)`` together, a prefill runs one sequence on its own row (``slot``). Hidden states follow the modules from device to device (a multi-GPU plan
keeps layers on several GPUs).
"""

from __future__ import annotations

import torch
from torch import nn

from ktcore.runtime.blocks import device_of


class Decoder(nn.Module):
    def __init__(self, model: nn.Module, config, batch: int, max_len: int, cache_dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.model = model  # the transformers CausalLM skeleton, filled by Builder
        self.batch = batch
        self.max_len = max_len
        self.cache_dtype = cache_dtype
        layers = model.model.layers
        self.caches = nn.ModuleList(layer.self_attn.new_cache(batch, max_len, cache_dtype) for layer in layers)
        self.layer_devices = [device_of(layer.input_layernorm) for layer in layers]
        self.attn_devices = [layer.self_attn.device for layer in layers]

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                last_only: bool = False, slot: int | None = None) -> torch.Tensor:
        """``slot``: the batch (of one sequence) uses cache row ``slot`` instead of rows
        ``[0, B)`` (prefill of one of several concurrent sequences)."""
        inner = self.model.model
        caches = self.caches if slot is None else [c.rows(slot, slot + ids.shape[0]) for c in self.caches]
        embed_dev = device_of(inner.embed_tokens)
        h = inner.embed_tokens(ids.to(embed_dev))  # [B, T, H]
        moved: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(inner.layers):
            h = h.to(self.layer_devices[i])
            attn_dev = self.attn_devices[i]
            if attn_dev not in moved:
                moved[attn_dev] = (positions.to(attn_dev), cache_lens.to(attn_dev))
            pos, lens = moved[attn_dev]
            a = layer.self_attn(layer.input_layernorm(h).to(attn_dev), pos, caches[i], lens)
            h = h + a.to(h.device)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if last_only:
            h = h[:, -1:]
        h = inner.norm(h.to(device_of(inner.norm)))
        return self.model.lm_head(h.to(device_of(self.model.lm_head)))  # [B, T, V]
