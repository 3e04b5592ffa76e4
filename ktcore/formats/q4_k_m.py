"""llama.cpp's Q4_K_M type mix: which GGUF type ``llama-quantize ... Q4_K_M`` gives each tensor.

The rule is ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` for
``LLAMA_FTYPE_MOSTLY_Q4_K_M`` without an importance matrix or per-tensor overrides, as far as
it applies to the architectures of ``gguf_names`` (written from the llama.cpp source as read
before; not checked against a llama.cpp build here). See ``q4_k_m_types``.
"""

from __future__ import annotations

from typing import Any

from ktcore.formats.gguf_names import gguf_plan, num_experts
from ktcore.formats.gguf_write import tensor_type


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's ``use_more_bits(i_layer, n_layers)``: the first and last eighth of the
    layers and every third layer in between (C integer division)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_types(config: Any, n_layers: int | None = None) -> dict[str, str]:
    """GGUF type of every tensor of ``gguf_plan(config)`` (by GGUF name) in the Q4_K_M mix.

    With ``n`` the layer count (llama.cpp's ``n_attention_wv`` and ``n_ffn_down``, both the
    layer count for these architectures) and ``i`` the tensor's layer (``blk.i``):

    - ``output.weight``: Q6_K.
    - ``attn_v.weight``: Q6_K where ``use_more_bits(i, n)``, else Q4_K; models with exactly 8
      experts (Mixtral) get Q8_0 whatever the layer.
    - every tensor whose name contains ``ffn_down`` (``ffn_down``, ``ffn_down_exps``,
      ``ffn_down_shexp``): Q6_K where ``use_more_bits(i, n)``, else Q4_K.
    - 8-expert models only: ``attn_k.weight`` Q8_0, ``attn_output.weight`` Q5_K.
    - 1-D tensors, norms, biases and the routers (``ffn_gate_inp``, ``exp_probs_b``): F32.
    - everything else, ``token_embd`` included: Q4_K.

    Then a tensor whose row length is not a multiple of its type's block falls back as
    llama-quant.cpp does (``gguf_write.tensor_type``: Q4_K -> Q5_0, Q6_K -> Q8_0, else F16).

    ``n_layers`` replaces ``n`` (default the config's layer count): a model cut to its first
    layers *after* quantising the full one keeps the full model's choices (the first 12 of 48
    layers: 0-5, 8 and 11 in Q6_K; quantised as a 12-layer model: 0, 3, 6, 9, 10 and 11).
    Not modelled: the MLA-specific and fused (``attn_qkv``: Q5_K) tensors' own cases.
    """
    n = n_layers if n_layers is not None else int(config.num_hidden_layers)
    eight = num_experts(config) == 8
    types = {}
    for spec in gguf_plan(config):
        name = spec.name
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        want = "Q4_K"
        if name == "output.weight":
            want = "Q6_K"
        elif "attn_v.weight" in name:
            want = "Q8_0" if eight else "Q6_K" if use_more_bits(layer, n) else "Q4_K"
        elif "ffn_down" in name:
            want = "Q6_K" if use_more_bits(layer, n) else "Q4_K"
        elif eight and "attn_k.weight" in name:
            want = "Q8_0"
        elif eight and "attn_output.weight" in name:
            want = "Q5_K"
        types[name] = tensor_type(spec, want)  # F32 for norms/routers/biases, row-length fallbacks
    return types
