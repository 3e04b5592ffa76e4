"""GGUF tensor names and the transforms llama.cpp's converter applies, per architecture.

One ``GGUFTensorSpec`` per tensor of a GGUF file: its llama.cpp name (from gguf-py's
``TENSOR_NAMES``), its shape in torch order (GGUF's ``ne`` reversed), the canonical ktcore
tensor it comes from (``ktcore.formats.store``: transformers names, routed experts stacked as
``model.layers.N.mlp.experts.gate|up|down``) and the transform between the two:

- ``copy``: none.
- ``rope_permute``: Mixtral (llama arch) q/k rows reordered from HF's half-split RoPE layout to
  llama.cpp's interleaved one (``LlamaModel.permute``). A row permutation, so it is undone on
  quantised blocks directly (rows are independent in every GGUF type).
- ``k_b`` / ``v_b``: DeepSeek's ``kv_b_proj [nH*(nope+v), R]`` split per head into
  ``attn_k_b [nH, R, nope]`` (transposed per head) and ``attn_v_b [nH, v, R]``; the current
  converter no longer writes ``attn_kv_b`` and llama.cpp's loader requires k_b/v_b whenever
  ``key_length_mla`` is set. ``k_b``'s transpose crosses the block axis, so reading a quantised
  ``k_b`` back into ``kv_b_proj`` dequantises it (``kv_b_from_parts``).

Reading also accepts the layouts llama.cpp loads besides the default one (``alternatives``):
a legacy unsplit ``attn_kv_b``, fused ``ffn_gate_up_exps`` and fused ``attn_qkv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES

from ktcore.errors import KtError
from ktcore.formats.store import expert_name

#: HF ``model_type`` -> llama.cpp architecture.
ARCH_OF_MODEL_TYPE: dict[str, MODEL_ARCH] = {
    "deepseek_v3": MODEL_ARCH.DEEPSEEK2,
    "deepseek_v2": MODEL_ARCH.DEEPSEEK2,
    "qwen3_moe": MODEL_ARCH.QWEN3MOE,
    "qwen2_moe": MODEL_ARCH.QWEN2MOE,
    "mixtral": MODEL_ARCH.LLAMA,
}

#: Tensors llama.cpp keeps in F32 whatever the file type (converter and llama-quant agree).
_ALWAYS_F32 = (MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_INP_SHEXP, MODEL_TENSOR.FFN_EXP_PROBS_B)

TRANSFORMS = ("copy", "rope_permute", "k_b", "v_b")


@dataclass(frozen=True)
class GGUFTensorSpec:
    """One tensor of a GGUF file and where its values come from."""

    name: str  # GGUF name, e.g. "blk.3.attn_k_b.weight"
    shape: tuple[int, ...]  # torch order (GGUF ne reversed)
    source: str  # canonical ktcore name it is made from
    kind: MODEL_TENSOR
    transform: str = "copy"
    heads: int = 0  # rope_permute: heads of this projection; k_b/v_b: attention heads
    split: tuple[int, int] = (0, 0)  # k_b/v_b: (qk_nope_head_dim, v_head_dim)

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")

    @property
    def keep_f32(self) -> bool:
        """Stored as F32 whatever the requested type: 1-D tensors, norms, biases, routers."""
        return (len(self.shape) < 2 or self.name.endswith("_norm.weight")
                or not self.name.endswith(".weight") or self.kind in _ALWAYS_F32)


@dataclass(frozen=True)
class FusedSlice:
    """A canonical tensor read as rows ``[start, stop)`` of dim ``dim`` of a fused GGUF tensor."""

    name: str  # fused GGUF tensor, e.g. "blk.0.ffn_gate_up_exps.weight"
    shape: tuple[int, ...]  # torch shape of the fused tensor
    dim: int  # sliced dimension (never the last one: rows stay whole blocks)
    start: int
    stop: int


def _attr(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def gguf_arch(config_or_model_type: Any) -> str:
    """llama.cpp architecture name (``general.architecture``) of a config or a model_type."""
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    if model_type not in ARCH_OF_MODEL_TYPE:
        raise KtError(f"model_type {model_type!r} has no GGUF mapping; supported: {', '.join(ARCH_OF_MODEL_TYPE)}")
    return MODEL_ARCH_NAMES[ARCH_OF_MODEL_TYPE[model_type]]


def tensor_name(kind: MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    """``gguf.TENSOR_NAMES[kind]`` with the block id filled in, plus the suffix."""
    name = TENSOR_NAMES[kind]
    return (name.format(bid=bid) if "{bid}" in name else name) + suffix


def head_dim(config: Any) -> int:
    return _attr(config, "head_dim", default=None) or config.hidden_size // config.num_attention_heads


def is_moe_layer(config: Any, i: int) -> bool:
    """Whether decoder layer ``i`` has routed experts (else a dense MLP), as transformers builds it."""
    if config.model_type in ("deepseek_v3", "deepseek_v2"):
        return bool(_attr(config, "n_routed_experts")) and i >= (_attr(config, "first_k_dense_replace", default=0))
    if config.model_type in ("qwen3_moe", "qwen2_moe"):
        step = _attr(config, "decoder_sparse_step", default=1)
        return (i not in (_attr(config, "mlp_only_layers", default=[]) or [])
                and _attr(config, "num_experts", "num_local_experts", default=0) > 0 and (i + 1) % step == 0)
    return True  # mixtral


def num_experts(config: Any) -> int:
    return _attr(config, "n_routed_experts", "num_experts", "num_local_experts", default=0)


def gguf_plan(config: Any) -> list[GGUFTensorSpec]:
    """Every tensor a GGUF of ``config`` holds, in file order (shapes in torch order)."""
    gguf_arch(config)
    V, H = config.vocab_size, config.hidden_size
    T = MODEL_TENSOR
    specs = [GGUFTensorSpec(tensor_name(T.TOKEN_EMBD), (V, H), "model.embed_tokens.weight", T.TOKEN_EMBD)]
    for i in range(config.num_hidden_layers):
        specs += _layer_specs(config, i)
    specs.append(GGUFTensorSpec(tensor_name(T.OUTPUT_NORM), (H,), "model.norm.weight", T.OUTPUT_NORM))
    if not getattr(config, "tie_word_embeddings", False):  # tied: llama.cpp reuses token_embd
        specs.append(GGUFTensorSpec(tensor_name(T.OUTPUT), (V, H), "lm_head.weight", T.OUTPUT))
    return specs


def canonical_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the model of ``config`` and its shape, in model order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in gguf_plan(config):
        if spec.transform == "k_b":  # kv_b_proj [nH*(nope+v), R] from k_b [nH, R, nope]
            nope, v = spec.split
            shapes[spec.source] = (spec.heads * (nope + v), spec.shape[1])
        elif spec.transform != "v_b":
            shapes[spec.source] = spec.shape
    return shapes


def _layer_specs(config: Any, i: int) -> list[GGUFTensorSpec]:
    p = f"model.layers.{i}."
    H = config.hidden_size
    out: list[GGUFTensorSpec] = []

    def add(kind: MODEL_TENSOR, source: str, shape: tuple[int, ...], suffix: str = ".weight", **kw: Any) -> None:
        out.append(GGUFTensorSpec(tensor_name(kind, i, suffix), tuple(shape), p + source, kind, **kw))

    add(MODEL_TENSOR.ATTN_NORM, "input_layernorm.weight", (H,))
    if config.model_type in ("deepseek_v3", "deepseek_v2"):
        _mla_specs(config, add)
    else:
        _gqa_specs(config, add)
    add(MODEL_TENSOR.FFN_NORM, "post_attention_layernorm.weight", (H,))
    if not is_moe_layer(config, i):
        inter = config.intermediate_size
        add(MODEL_TENSOR.FFN_GATE, "mlp.gate_proj.weight", (inter, H))
        add(MODEL_TENSOR.FFN_UP, "mlp.up_proj.weight", (inter, H))
        add(MODEL_TENSOR.FFN_DOWN, "mlp.down_proj.weight", (H, inter))
        return out
    E = num_experts(config)
    inter = _attr(config, "moe_intermediate_size", "intermediate_size")
    add(MODEL_TENSOR.FFN_GATE_INP, "mlp.gate.weight", (E, H))
    if config.model_type == "deepseek_v3":
        add(MODEL_TENSOR.FFN_EXP_PROBS_B, "mlp.gate.e_score_correction_bias", (E,), suffix=".bias")
    for kind, part, shape in ((MODEL_TENSOR.FFN_GATE_EXP, "gate", (E, inter, H)),
                              (MODEL_TENSOR.FFN_UP_EXP, "up", (E, inter, H)),
                              (MODEL_TENSOR.FFN_DOWN_EXP, "down", (E, H, inter))):
        out.append(GGUFTensorSpec(tensor_name(kind, i), shape, expert_name(i, part), kind))
    if config.model_type in ("deepseek_v3", "deepseek_v2"):
        shared, prefix = inter * (_attr(config, "n_shared_experts", default=0)), "mlp.shared_experts."
    elif config.model_type == "qwen2_moe":
        shared, prefix = config.shared_expert_intermediate_size, "mlp.shared_expert."
    else:
        shared, prefix = 0, ""
    if shared:
        add(MODEL_TENSOR.FFN_GATE_SHEXP, prefix + "gate_proj.weight", (shared, H))
        add(MODEL_TENSOR.FFN_UP_SHEXP, prefix + "up_proj.weight", (shared, H))
        add(MODEL_TENSOR.FFN_DOWN_SHEXP, prefix + "down_proj.weight", (H, shared))
    if config.model_type == "qwen2_moe":
        add(MODEL_TENSOR.FFN_GATE_INP_SHEXP, "mlp.shared_expert_gate.weight", (1, H))
    return out


def _gqa_specs(config: Any, add: Any) -> None:
    H, nH, nKV, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    permute = config.model_type == "mixtral"  # llama arch: HF half-split rope -> interleaved rows
    q_kw = dict(transform="rope_permute", heads=nH) if permute else {}
    k_kw = dict(transform="rope_permute", heads=nKV) if permute else {}
    add(MODEL_TENSOR.ATTN_Q, "self_attn.q_proj.weight", (nH * hd, H), **q_kw)
    add(MODEL_TENSOR.ATTN_K, "self_attn.k_proj.weight", (nKV * hd, H), **k_kw)
    add(MODEL_TENSOR.ATTN_V, "self_attn.v_proj.weight", (nKV * hd, H))
    if config.model_type == "qwen2_moe" and _attr(config, "qkv_bias", default=True) or \
            config.model_type == "qwen3_moe" and _attr(config, "attention_bias", default=False):
        add(MODEL_TENSOR.ATTN_Q, "self_attn.q_proj.bias", (nH * hd,), suffix=".bias")
        add(MODEL_TENSOR.ATTN_K, "self_attn.k_proj.bias", (nKV * hd,), suffix=".bias")
        add(MODEL_TENSOR.ATTN_V, "self_attn.v_proj.bias", (nKV * hd,), suffix=".bias")
    add(MODEL_TENSOR.ATTN_OUT, "self_attn.o_proj.weight", (H, nH * hd))
    if config.model_type == "qwen3_moe":
        if _attr(config, "attention_bias", default=False):
            add(MODEL_TENSOR.ATTN_OUT, "self_attn.o_proj.bias", (H,), suffix=".bias")
        add(MODEL_TENSOR.ATTN_Q_NORM, "self_attn.q_norm.weight", (hd,))
        add(MODEL_TENSOR.ATTN_K_NORM, "self_attn.k_norm.weight", (hd,))


def _mla_specs(config: Any, add: Any) -> None:
    if _attr(config, "attention_bias", default=False):
        raise KtError(f"{config.model_type} with attention_bias=True has no llama.cpp GGUF layout")
    H, nH, R = config.hidden_size, config.num_attention_heads, config.kv_lora_rank
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    q_rank = _attr(config, "q_lora_rank")
    if q_rank:
        add(MODEL_TENSOR.ATTN_Q_A, "self_attn.q_a_proj.weight", (q_rank, H))
        add(MODEL_TENSOR.ATTN_Q_A_NORM, "self_attn.q_a_layernorm.weight", (q_rank,))
        add(MODEL_TENSOR.ATTN_Q_B, "self_attn.q_b_proj.weight", (nH * (nope + rope), q_rank))
    else:
        add(MODEL_TENSOR.ATTN_Q, "self_attn.q_proj.weight", (nH * (nope + rope), H))
    add(MODEL_TENSOR.ATTN_KV_A_MQA, "self_attn.kv_a_proj_with_mqa.weight", (R + rope, H))
    add(MODEL_TENSOR.ATTN_KV_A_NORM, "self_attn.kv_a_layernorm.weight", (R,))
    add(MODEL_TENSOR.ATTN_K_B, "self_attn.kv_b_proj.weight", (nH, R, nope), transform="k_b", heads=nH, split=(nope, v))
    add(MODEL_TENSOR.ATTN_V_B, "self_attn.kv_b_proj.weight", (nH, v, R), transform="v_b", heads=nH, split=(nope, v))
    add(MODEL_TENSOR.ATTN_OUT, "self_attn.o_proj.weight", (H, nH * v))


# ----------------------------------------------------------------------------------- transforms

def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permutation: ``gguf_rows = hf_rows[perm]``.

    Per head, HF rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` (half-split RoPE pairs) become
    ``[x_0, y_0, x_1, y_1, ...]`` (interleaved pairs).
    """
    if rows % heads or (rows // heads) % 2:
        raise KtError(f"rope permutation: {rows} rows do not split into {heads} heads of even size")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def to_gguf(spec: GGUFTensorSpec, tensor: torch.Tensor) -> torch.Tensor:
    """The GGUF tensor of ``spec`` from its canonical source tensor (dense)."""
    if spec.transform == "copy":
        return tensor
    if spec.transform == "rope_permute":  # [nH*hd, H] rows reordered
        return tensor[rope_permutation(tensor.shape[0], spec.heads)]
    nope, v = spec.split
    kv = tensor.reshape(spec.heads, nope + v, tensor.shape[-1])  # [nH, nope+v, R]
    if spec.transform == "k_b":
        return kv[:, :nope, :].transpose(1, 2).contiguous()  # [nH, R, nope]
    return kv[:, nope:, :].contiguous()  # v_b: [nH, v, R]


def from_gguf_rows(spec: GGUFTensorSpec, rows: torch.Tensor) -> torch.Tensor:
    """Undoes a row transform on ``rows [n_rows, ...]``: floats or raw quantised bytes alike."""
    if spec.transform == "copy":
        return rows
    if spec.transform != "rope_permute":
        raise ValueError(f"{spec.name}: transform {spec.transform} is not a row permutation")
    inverse = torch.argsort(rope_permutation(rows.shape[0], spec.heads))
    return rows[inverse]


def kv_b_from_parts(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """``kv_b_proj [nH*(nope+v), R]`` from dense ``k_b [nH, R, nope]`` and ``v_b [nH, v, R]``."""
    heads, rank = k_b.shape[0], k_b.shape[1]
    if v_b.shape[0] != heads or v_b.shape[2] != rank:
        raise KtError(f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} do not fit together")
    kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [nH, nope+v, R]
    return kv.reshape(-1, rank)


def alternatives(spec: GGUFTensorSpec, config: Any) -> list[FusedSlice]:
    """Fused GGUF tensors llama.cpp also loads in place of ``spec`` (legacy kv_b handled apart)."""
    bid = int(spec.name.split(".")[1]) if spec.name.startswith("blk.") else None
    suffix = "." + spec.name.rsplit(".", 1)[1]
    if spec.kind in (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP):
        E, inter, H = spec.shape
        start = 0 if spec.kind == MODEL_TENSOR.FFN_GATE_EXP else inter
        return [FusedSlice(tensor_name(MODEL_TENSOR.FFN_GATE_UP_EXP, bid), (E, 2 * inter, H), 1, start, start + inter)]
    if spec.kind in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V) and \
            config.model_type not in ("deepseek_v3", "deepseek_v2"):
        nH, nKV, hd = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
        sizes = {MODEL_TENSOR.ATTN_Q: (0, nH * hd), MODEL_TENSOR.ATTN_K: (nH * hd, nKV * hd),
                 MODEL_TENSOR.ATTN_V: ((nH + nKV) * hd, nKV * hd)}
        start, n = sizes[spec.kind]
        fused = ((nH + 2 * nKV) * hd,) + spec.shape[1:]
        return [FusedSlice(tensor_name(MODEL_TENSOR.ATTN_QKV, bid, suffix), fused, 0, start, start + n)]
    return []


def legacy_kv_b_name(spec: GGUFTensorSpec) -> str:
    """The unsplit ``attn_kv_b`` of old DeepSeek GGUFs, for a k_b/v_b spec."""
    return tensor_name(MODEL_TENSOR.ATTN_KV_B, int(spec.name.split(".")[1]))
