"""GGUF tensor names, shapes and transforms against gguf-py's constants, llama.cpp's loader and transformers."""

from __future__ import annotations

import pytest
import torch
from gguf import (MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES,
                  GGMLQuantizationType)
from gguf.quants import dequantize, quantize

from ktcore.errors import KtError
from ktcore.formats.store import canonical_from_hf
from ktcore.formats.gguf_names import (alternatives, canonical_shapes, from_gguf_rows, gguf_arch,
                                       gguf_plan, kv_b_from_parts, rope_permutation, to_gguf)
from ktcore.models.presets import ARCHITECTURES, make_config

ARCH = {"deepseek_v3": MODEL_ARCH.DEEPSEEK2, "deepseek_v2": MODEL_ARCH.DEEPSEEK2, "qwen3_moe": MODEL_ARCH.QWEN3MOE,
        "qwen2_moe": MODEL_ARCH.QWEN2MOE, "mixtral": MODEL_ARCH.LLAMA}


def _hf_shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: tuple(t.shape) for name, t in canonical_from_hf(state)}


def _tn(kind: MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    return TENSOR_NAMES[kind].format(bid=bid) + suffix


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_arch_names_are_gguf_py_constants(arch):
    assert gguf_arch(make_config(arch)) == MODEL_ARCH_NAMES[ARCH[arch]]
    assert gguf_arch(arch) == MODEL_ARCH_NAMES[ARCH[arch]]


def test_unsupported_model_type():
    with pytest.raises(KtError, match="llama4"):
        gguf_arch("llama4")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("variant", ["preset", "tied"])
def test_canonical_shapes_match_transformers(arch, variant):
    config = make_config(arch, **({"tie_word_embeddings": True} if variant == "tied" else {}))
    assert canonical_shapes(config) == _hf_shapes(config)


def test_qwen_dense_layers_match_transformers():
    config = make_config("qwen3_moe", mlp_only_layers=[1])
    assert canonical_shapes(config) == _hf_shapes(config)
    names = [s.name for s in gguf_plan(config)]
    assert _tn(MODEL_TENSOR.FFN_GATE, 1) in names and _tn(MODEL_TENSOR.FFN_GATE_INP, 1) not in names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_name_is_a_tensor_of_the_llama_cpp_arch(arch):
    config = make_config(arch)
    allowed = MODEL_TENSORS[ARCH[arch]]
    for spec in gguf_plan(config):
        assert spec.kind in allowed, spec.name
        bid = int(spec.name.split(".")[1]) if spec.name.startswith("blk.") else None
        assert spec.name in (_tn(spec.kind, bid), _tn(spec.kind, bid, ".bias"))
    names = {s.name for s in gguf_plan(config)}
    assert len(names) == len(gguf_plan(config))


def _expected_layer_names(arch: str, bid: int) -> set[str]:
    """Layer ``bid`` (a MoE layer) of each tiny preset, spelled with gguf-py's constants."""
    T = MODEL_TENSOR
    common = {_tn(T.ATTN_NORM, bid), _tn(T.FFN_NORM, bid), _tn(T.ATTN_OUT, bid), _tn(T.FFN_GATE_INP, bid),
              _tn(T.FFN_GATE_EXP, bid), _tn(T.FFN_UP_EXP, bid), _tn(T.FFN_DOWN_EXP, bid)}
    gqa = {_tn(T.ATTN_Q, bid), _tn(T.ATTN_K, bid), _tn(T.ATTN_V, bid)}
    mla = {_tn(T.ATTN_KV_A_MQA, bid), _tn(T.ATTN_KV_A_NORM, bid), _tn(T.ATTN_K_B, bid), _tn(T.ATTN_V_B, bid)}
    shexp = {_tn(T.FFN_GATE_SHEXP, bid), _tn(T.FFN_UP_SHEXP, bid), _tn(T.FFN_DOWN_SHEXP, bid)}
    return {
        "deepseek_v3": common | mla | shexp | {_tn(T.ATTN_Q_A, bid), _tn(T.ATTN_Q_A_NORM, bid), _tn(T.ATTN_Q_B, bid),
                                               _tn(T.FFN_EXP_PROBS_B, bid, ".bias")},
        "deepseek_v2": common | mla | shexp | {_tn(T.ATTN_Q, bid)},
        "qwen3_moe": common | gqa | {_tn(T.ATTN_Q_NORM, bid), _tn(T.ATTN_K_NORM, bid)},
        "qwen2_moe": common | gqa | shexp | {_tn(T.FFN_GATE_INP_SHEXP, bid)}
                     | {_tn(k, bid, ".bias") for k in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)},
        "mixtral": common | gqa,
    }[arch]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_names(arch):
    names = {s.name for s in gguf_plan(make_config(arch)) if s.name.startswith("blk.1.")}
    assert names == _expected_layer_names(arch, 1)


def test_deepseek_dense_first_layer_and_no_kv_b():
    names = {s.name for s in gguf_plan(make_config("deepseek_v3"))}
    assert {_tn(MODEL_TENSOR.FFN_GATE, 0), _tn(MODEL_TENSOR.FFN_UP, 0), _tn(MODEL_TENSOR.FFN_DOWN, 0)} <= names
    assert _tn(MODEL_TENSOR.FFN_GATE_INP, 0) not in names
    assert not any(".attn_kv_b." in n for n in names)  # the current converter splits it into k_b / v_b


def _ne(config, kind: MODEL_TENSOR) -> tuple[int, ...]:
    """GGML ``ne`` that llama.cpp's loader asks for (src/models/*.cpp ``create_tensor`` calls)."""
    H, V, nH = config.hidden_size, config.vocab_size, config.num_attention_heads
    T = MODEL_TENSOR
    if config.model_type.startswith("deepseek"):
        R, rope, nope, v = config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim
        E, I = config.n_routed_experts, config.moe_intermediate_size
        table = {T.ATTN_KV_A_MQA: (H, R + rope), T.ATTN_K_B: (nope, R, nH), T.ATTN_V_B: (R, v, nH),
                 T.ATTN_OUT: (nH * v, H), T.ATTN_Q: (H, nH * (nope + rope)), T.FFN_EXP_PROBS_B: (E,),
                 T.FFN_GATE_SHEXP: (H, I * config.n_shared_experts)}
    else:
        hd = getattr(config, "head_dim", None) or H // nH
        E = getattr(config, "num_experts", None) or config.num_local_experts
        I = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        table = {T.ATTN_K: (H, config.num_key_value_heads * hd), T.ATTN_Q: (H, nH * hd), T.ATTN_OUT: (nH * hd, H)}
    table.update({T.TOKEN_EMBD: (H, V), T.OUTPUT: (H, V), T.FFN_GATE_INP: (H, E), T.FFN_GATE_EXP: (H, I, E),
                  T.FFN_DOWN_EXP: (I, H, E)})
    return table.get(kind, ())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_are_what_the_llama_cpp_loader_asks_for(arch):
    config = make_config(arch)
    checked = 0
    for spec in gguf_plan(config):
        want = _ne(config, spec.kind)
        if want and spec.name.endswith(".weight") or spec.kind == MODEL_TENSOR.FFN_EXP_PROBS_B:
            assert tuple(reversed(spec.shape)) == want, spec.name
            checked += 1
    assert checked >= 8


def test_qwen2_shared_gate_is_ne_h_by_1():
    spec = next(s for s in gguf_plan(make_config("qwen2_moe")) if s.kind == MODEL_TENSOR.FFN_GATE_INP_SHEXP)
    assert tuple(reversed(spec.shape)) == (64, 1) and spec.keep_f32  # the loader's {n_embd}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f32_rules(arch):
    for spec in gguf_plan(make_config(arch)):
        router = spec.kind in (MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_INP_SHEXP, MODEL_TENSOR.FFN_EXP_PROBS_B)
        small = len(spec.shape) == 1 or spec.name.endswith("_norm.weight") or spec.name.endswith(".bias")
        assert spec.keep_f32 == (router or small), spec.name


@pytest.mark.parametrize("heads,head_dim", [(4, 16), (2, 16), (1, 2), (8, 6)])
def test_rope_permutation_interleaves_each_head(heads, head_dim):
    w = torch.randn(heads * head_dim, 5)
    perm = rope_permutation(w.shape[0], heads)
    out = w[perm]
    half = head_dim // 2
    for h in range(heads):  # per head: rows (x0, y0, x1, y1, ...) from HF's (x0..x_{d/2-1}, y0..)
        block = w[h * head_dim:(h + 1) * head_dim]
        expect = torch.stack([block[:half], block[half:]], dim=1).reshape(head_dim, 5)
        assert torch.equal(out[h * head_dim:(h + 1) * head_dim], expect)
    assert sorted(perm.tolist()) == list(range(w.shape[0]))


def test_rope_permutation_needs_even_heads():
    with pytest.raises(KtError):
        rope_permutation(12, 4)  # head size 3


def test_mixtral_q_k_permuted_and_undone_on_quantised_rows():
    config = make_config("mixtral")
    q_spec, k_spec = (s for s in gguf_plan(config) if s.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"))
    assert (q_spec.transform, q_spec.heads, k_spec.heads) == ("rope_permute", 4, 2)
    w = torch.randn(q_spec.shape)
    stored = to_gguf(q_spec, w)
    assert torch.equal(from_gguf_rows(q_spec, stored), w)
    q8 = GGMLQuantizationType.Q8_0
    blocks = torch.from_numpy(quantize(stored.numpy(), q8))  # [rows, row_bytes]
    back = from_gguf_rows(q_spec, blocks)
    assert torch.equal(torch.from_numpy(dequantize(back.numpy(), q8)),
                       torch.from_numpy(dequantize(quantize(w.numpy(), q8), q8)))


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_kv_b_split_into_k_b_and_v_b(arch):
    config = make_config(arch)
    nH, nope, v, R = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    k_spec, v_spec = (s for s in gguf_plan(config) if s.name in ("blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"))
    kv_b = torch.randn(nH * (nope + v), R)
    k_b, v_b = to_gguf(k_spec, kv_b), to_gguf(v_spec, kv_b)
    assert k_b.shape == (nH, R, nope) and v_b.shape == (nH, v, R)
    for h in range(nH):  # head h of kv_b: nope key rows, then v value rows
        rows = kv_b[h * (nope + v):(h + 1) * (nope + v)]
        assert torch.equal(k_b[h], rows[:nope].T) and torch.equal(v_b[h], rows[nope:])
    assert torch.equal(kv_b_from_parts(k_b, v_b), kv_b)
    with pytest.raises(KtError):
        kv_b_from_parts(k_b, v_b[:, :, :-1])


def test_fused_alternatives():
    config = make_config("qwen3_moe")
    plan = {s.name: s for s in gguf_plan(config)}
    gate, = alternatives(plan["blk.0.ffn_gate_exps.weight"], config)
    up, = alternatives(plan["blk.0.ffn_up_exps.weight"], config)
    assert gate.name == up.name == _tn(MODEL_TENSOR.FFN_GATE_UP_EXP, 0)
    assert gate.shape == (16, 64, 64) and (gate.start, gate.stop, up.start, up.stop) == (0, 32, 32, 64)
    k, = alternatives(plan["blk.0.attn_k.weight"], config)
    assert k.name == _tn(MODEL_TENSOR.ATTN_QKV, 0) and k.shape == (128, 64) and (k.start, k.stop) == (64, 96)
    assert alternatives(plan["blk.0.attn_norm.weight"], config) == []


def test_canonical_from_hf_splits_fused_experts():
    gate_up, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    out = dict(canonical_from_hf({"model.layers.2.mlp.experts.gate_up_proj": gate_up,
                                  "model.layers.2.mlp.experts.down_proj": down, "model.norm.weight": torch.ones(5)}))
    assert torch.equal(out["model.layers.2.mlp.experts.gate"], gate_up[:, :4])
    assert torch.equal(out["model.layers.2.mlp.experts.up"], gate_up[:, 4:])
    assert torch.equal(out["model.layers.2.mlp.experts.down"], down)
    assert "model.norm.weight" in out

