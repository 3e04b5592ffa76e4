"""GGUF metadata: transformers config <-> llama.cpp keys, and the byte-level BPE tokenizer.

Writing follows llama.cpp's converter (``convert_hf_to_gguf.py``) key for key, through
``gguf.GGUFWriter``'s ``add_*`` helpers (so names and value types are gguf-py's), plus the keys
llama.cpp's loader needs that the converter leaves to defaults. Reading (``config_from_metadata``)
rebuilds a transformers config of the right ``model_type`` for a GGUF given without an HF
directory. Decisions where the two sides do not map one to one are in ``docs/gguf.md``.

Metadata for reading is a plain ``{key: value}`` dict (``gguf_read.read_metadata``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from gguf import (GGML_QUANT_VERSION, ExpertGatingFuncType, GGUFType, GGUFWriter, Keys, LlamaFileType,
                  RopeScalingType, TokenType)

from ktcore.errors import KtError
from ktcore.formats.gguf_names import gguf_arch, head_dim, is_moe_layer, num_experts

logger = logging.getLogger(__name__)

#: Requested tensor type -> ``general.file_type`` (K-quants: the ``_M`` mixes llama-quantize names).
FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0, "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q2_K": LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": LlamaFileType.MOSTLY_Q3_K_M, "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": LlamaFileType.MOSTLY_Q6_K,
}

#: HF ``Split`` regexes whose llama.cpp pre-tokenizer is the same (llama-vocab.cpp keeps them
#: as "original regex from tokenizer.json" beside its adapted copy).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
#: llama.cpp pre-tokenizer names this module can rebuild, with llama.cpp's default add_bos.
PRE_TOKENIZERS = {"gpt-2": False, "llama-bpe": True, "llama3": True, "qwen2": False}


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that float32 rounds back to it."""
    return float(str(np.float32(value)))


def rope_parameters(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def _mla(config: Any) -> bool:
    return config.model_type in ("deepseek_v3", "deepseek_v2")


# ------------------------------------------------------------------------- config -> metadata

def add_model_metadata(writer: GGUFWriter, config: Any, *, qtype: str = "F32", name: str | None = None) -> None:
    """Adds ``general.*`` and ``{arch}.*`` keys of ``config`` to ``writer`` (arch = writer.arch)."""
    if writer.arch != gguf_arch(config):
        raise KtError(f"GGUF writer is for {writer.arch!r}, config is {config.model_type!r}")
    w = writer
    w.add_type(GGUFType.MODEL)
    w.add_name(name or config.model_type)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    _add_rope(w, config)
    if _mla(config):
        _add_mla(w, config)
    else:
        hd = head_dim(config)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
    _add_experts(w, config)


def _add_rope(w: GGUFWriter, config: Any) -> None:
    rope = rope_parameters(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                            or config.max_position_embeddings))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        if _mla(config) and rope.get("mscale_all_dim"):
            # the converter stores 0.1 * mscale_all_dim; llama.cpp divides it back out
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
            if rope.get("mscale") not in (None, rope["mscale_all_dim"]):
                logger.warning("%s: yarn mscale %s != mscale_all_dim %s; GGUF keeps only mscale_all_dim "
                               "(llama.cpp assumes they are equal)",
                               config.model_type, rope["mscale"], rope["mscale_all_dim"])
    elif kind != "default":
        raise KtError(f"{config.model_type}: rope_type {kind!r} has no GGUF encoding (default, linear, yarn)")


def _add_mla(w: GGUFWriter, config: Any) -> None:
    R, rope, nope, v = config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim
    w.add_head_count_kv(1)  # MLA is stored as MQA over the latent (converter convention)
    w.add_key_length(R + rope)
    w.add_value_length(R)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(v)
    w.add_rope_dimension_count(rope)
    # llama.cpp requires q_lora_rank unless the layer count says "lite"; 0 means a plain q_proj
    w.add_q_lora_rank(config.q_lora_rank or 0)
    w.add_kv_lora_rank(R)
    w.add_leading_dense_block_count(config.first_k_dense_replace or 0)


def _add_experts(w: GGUFWriter, config: Any) -> None:
    w.add_expert_count(num_experts(config))
    w.add_expert_used_count(config.num_experts_per_tok)
    if config.model_type == "mixtral":
        return
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_weights_norm(bool(config.norm_topk_prob))
    if config.model_type == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if not _mla(config):
        return
    w.add_expert_shared_count(config.n_shared_experts or 0)
    w.add_expert_weights_scale(float(config.routed_scaling_factor))
    v3 = config.model_type == "deepseek_v3"
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if v3 else ExpertGatingFuncType.SOFTMAX)
    if v3 or getattr(config, "topk_method", None) == "group_limited_greedy":
        w.add_expert_group_count(config.n_group)
        w.add_expert_group_used_count(config.topk_group)


# ------------------------------------------------------------------------- metadata -> config

def model_type_of(meta: Mapping[str, Any], tensor_names: Iterable[str] = (), source: str = "<gguf>") -> str:
    """The HF model_type of a GGUF, or a ``KtError`` naming the unsupported architecture."""
    arch = meta.get(Keys.General.ARCHITECTURE)
    if arch == "deepseek2":
        gating = meta.get(Keys.LLM.EXPERT_GATING_FUNC.format(arch=arch))
        if gating is None:  # older files: V3 is the one with a score-correction bias
            return "deepseek_v3" if any(".exp_probs_b." in n for n in tensor_names) else "deepseek_v2"
        return "deepseek_v3" if gating == ExpertGatingFuncType.SIGMOID else "deepseek_v2"
    if arch in ("qwen3moe", "qwen2moe"):
        return {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}[arch]
    if arch == "llama" and meta.get(Keys.LLM.EXPERT_COUNT.format(arch=arch), 0) > 0:
        return "mixtral"
    what = "llama without experts (dense)" if arch == "llama" else repr(arch)
    raise KtError(f"{source}: GGUF architecture {what} is not supported "
                  f"(supported: deepseek2, qwen3moe, qwen2moe, llama with experts)")


def config_from_metadata(meta: Mapping[str, Any], tensor_names: Iterable[str] | None = None, source: str = "<gguf>"):
    """A transformers config of the right model_type from GGUF metadata (and tensor names).

    Tensor names decide what metadata cannot: tied embeddings (no ``output.weight``), dense
    layers of Qwen MoE models (no ``ffn_gate_inp``), attention biases.
    """
    from transformers import AutoConfig

    names = set(tensor_names or ())
    model_type = model_type_of(meta, names, source)
    arch = meta[Keys.General.ARCHITECTURE]

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(key.format(arch=arch))
        if value is None:
            if default is KeyError:
                raise KtError(f"{source}: metadata key {key.format(arch=arch)!r} is missing")
            return default
        return _f32(value) if isinstance(value, float) else value

    tokens = meta.get(Keys.Tokenizer.LIST)
    vocab = get(Keys.LLM.VOCAB_SIZE, len(tokens) if tokens else None)
    if vocab is None:
        raise KtError(f"{source}: neither {Keys.LLM.VOCAB_SIZE.format(arch=arch)!r} nor a token list "
                      f"gives the vocab size")
    layers = get(Keys.LLM.BLOCK_COUNT)
    kw: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=get(Keys.LLM.EMBEDDING_LENGTH), num_hidden_layers=layers,
        intermediate_size=get(Keys.LLM.FEED_FORWARD_LENGTH), num_attention_heads=get(Keys.Attention.HEAD_COUNT),
        max_position_embeddings=get(Keys.LLM.CONTEXT_LENGTH), rms_norm_eps=get(Keys.Attention.LAYERNORM_RMS_EPS),
        num_experts_per_tok=get(Keys.LLM.EXPERT_USED_COUNT),
        tie_word_embeddings=bool(names) and "output.weight" not in names,
        rope_parameters=_rope_from_meta(get, model_type),
    )
    n_experts = get(Keys.LLM.EXPERT_COUNT)
    if model_type.startswith("deepseek"):
        rope_dim = get(Keys.Rope.DIMENSION_COUNT)
        kw.update(
            num_key_value_heads=kw["num_attention_heads"], kv_lora_rank=get(Keys.Attention.KV_LORA_RANK),
            q_lora_rank=get(Keys.Attention.Q_LORA_RANK, 0) or None, qk_rope_head_dim=rope_dim,
            qk_nope_head_dim=get(Keys.Attention.KEY_LENGTH_MLA) - rope_dim,
            v_head_dim=get(Keys.Attention.VALUE_LENGTH_MLA),
            moe_intermediate_size=get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), n_routed_experts=n_experts,
            n_shared_experts=get(Keys.LLM.EXPERT_SHARED_COUNT, 0),
            first_k_dense_replace=get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0),
            routed_scaling_factor=get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0),
            norm_topk_prob=bool(get(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
            n_group=get(Keys.LLM.EXPERT_GROUP_COUNT, 1), topk_group=get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 1),
        )
        if model_type == "deepseek_v2":
            kw["topk_method"] = "group_limited_greedy" if kw["n_group"] > 1 else "greedy"
        else:
            kw["rope_interleave"] = True  # llama.cpp's deepseek2 rope is always the interleaved one
    else:
        kw["num_key_value_heads"] = get(Keys.Attention.HEAD_COUNT_KV, kw["num_attention_heads"])
        hd = get(Keys.Attention.KEY_LENGTH, kw["hidden_size"] // kw["num_attention_heads"])
        if model_type == "mixtral":
            kw["num_local_experts"] = n_experts
            if hd != kw["hidden_size"] // kw["num_attention_heads"]:
                kw["head_dim"] = hd
        else:
            default_norm = model_type == "qwen3_moe"  # what llama.cpp hard-codes per arch
            dense = [i for i in range(layers) if names and f"blk.{i}.ffn_gate_inp.weight" not in names]
            kw.update(num_experts=n_experts, moe_intermediate_size=get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH),
                      norm_topk_prob=bool(get(Keys.LLM.EXPERT_WEIGHTS_NORM, default_norm)),
                      decoder_sparse_step=1, mlp_only_layers=dense)
            if model_type == "qwen3_moe":
                kw["head_dim"] = hd
                kw["attention_bias"] = "blk.0.attn_q.bias" in names
            else:
                kw["shared_expert_intermediate_size"] = get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)
                if names:
                    kw["qkv_bias"] = "blk.0.attn_q.bias" in names
    for key, field in ((Keys.Tokenizer.BOS_ID, "bos_token_id"), (Keys.Tokenizer.EOS_ID, "eos_token_id"),
                       (Keys.Tokenizer.PAD_ID, "pad_token_id")):
        if meta.get(key) is not None:
            kw[field] = meta[key]
    try:
        config = AutoConfig.for_model(model_type, **kw)
    except (TypeError, ValueError) as exc:  # transformers' own validation of the values
        raise KtError(f"{source}: metadata gives an invalid {model_type} config: {exc}") from None
    for i in range(layers):  # sanity: the routed layers the config implies
        if names and is_moe_layer(config, i) != (f"blk.{i}.ffn_gate_inp.weight" in names):
            raise KtError(f"{source}: layer {i} routed experts do not match the metadata (leading dense blocks?)")
    return config


def _rope_from_meta(get: Any, model_type: str) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": get(Keys.Rope.FREQ_BASE, 10000.0)}
    kind = get(Keys.Rope.SCALING_TYPE, "none")
    factor = get(Keys.Rope.SCALING_FACTOR, None)
    if kind == RopeScalingType.LINEAR.value and factor:
        rope.update(rope_type="linear", factor=factor)
    elif kind == RopeScalingType.YARN.value:
        rope.update(rope_type="yarn", factor=factor,
                    original_max_position_embeddings=get(Keys.Rope.SCALING_ORIG_CTX_LEN, None)
                    or get(Keys.LLM.CONTEXT_LENGTH))
        for key, field in ((Keys.Rope.SCALING_YARN_BETA_FAST, "beta_fast"),
                           (Keys.Rope.SCALING_YARN_BETA_SLOW, "beta_slow"),
                           (Keys.Rope.SCALING_YARN_ATTN_FACTOR, "attention_factor")):
            if (value := get(key, None)) is not None:
                rope[field] = value
        log_mul = get(Keys.Rope.SCALING_YARN_LOG_MUL, None)
        if model_type.startswith("deepseek") and log_mul:
            # the converter stores 0.1 * mscale_all_dim, and llama.cpp assumes mscale == mscale_all_dim
            rope["mscale"] = rope["mscale_all_dim"] = _f32(log_mul / 0.1)
    return rope


# -------------------------------------------------------------------------------- tokenizer

def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise KtError(f"tokenizer {type(tokenizer).__name__} is not a `tokenizers`/fast tokenizer")
    return json.loads(backend.to_str())


def pretokenizer_name(pre_tokenizer: Mapping[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a `tokenizers` pre-tokenizer spec with the same regex."""
    pre = dict(pre_tokenizer or {})
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's regex, which llama.cpp's "gpt-2" pre-tokenizer uses
    parts = pre.get("pretokenizers", [])
    if pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split" \
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert") \
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space"):
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise KtError(f"pre-tokenizer {json.dumps(pre_tokenizer)[:200]} has no known llama.cpp equivalent "
                  f"(known: {', '.join(PRE_TOKENIZERS)}); pass pre= explicitly if you know it")


def add_tokenizer_metadata(writer: GGUFWriter, tokenizer: Any, vocab_size: int, *, pre: str | None = None) -> None:
    """Writes a byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model.

    The token list is padded to ``vocab_size`` with ``[PAD{i}]`` tokens of type UNUSED, as the
    converter does; added special tokens are CONTROL, other added tokens USER_DEFINED.
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise KtError("only byte-level BPE tokenizers can be written to GGUF (tokenizer.ggml.model = gpt2)")
    if spec.get("normalizer"):
        logger.warning("tokenizer normalizer %s is dropped: llama.cpp's gpt2 tokenizer does not normalise",
                       spec["normalizer"].get("type"))
    pre = pre or pretokenizer_name(spec.get("pre_tokenizer"))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    top = max([*model["vocab"].values(), *added, -1])
    if top >= vocab_size:
        raise KtError(f"tokenizer has token id {top}, beyond the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for i, a in added.items():
        tokens[i], types[i] = a["content"], TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    plain, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    add_bos = full[:1] != plain[:1]
    add_eos = full[-1:] != plain[-1:]
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    if add_bos and ids["bos"] is None:
        ids["bos"] = full[0]
    if add_eos and ids["eos"] is None:
        ids["eos"] = full[-1]
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[name] is not None:
            add(ids[name])
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str = "<gguf>"):
    """A ``transformers.PreTrainedTokenizerFast`` equal to the GGUF's byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get(Keys.Tokenizer.MODEL)
    if kind != "gpt2":
        raise KtError(f"{source}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta.get(Keys.Tokenizer.PRE, "default")
    if pre not in PRE_TOKENIZERS:
        raise KtError(f"{source}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = list(meta.get(Keys.Tokenizer.LIST) or [])
    if not tokens:
        raise KtError(f"{source}: metadata key {Keys.Tokenizer.LIST!r} is missing or empty")
    types = list(meta.get(Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens))
    vocab = {t: i for i, (t, kind_) in enumerate(zip(tokens, types)) if kind_ != TokenType.UNUSED}
    merges = []
    for m in meta.get(Keys.Tokenizer.MERGES) or []:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        merges.append((m[:cut], m[cut + 1:]))
    llama3 = PRE_TOKENIZERS[pre]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = QWEN2_REGEX if pre == "qwen2" else LLAMA3_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, k in enumerate(types) if k == TokenType.CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, k in enumerate(types) if k == TokenType.USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token(Keys.Tokenizer.BOS_ID), token(Keys.Tokenizer.EOS_ID)
    add_bos = bool(meta.get(Keys.Tokenizer.ADD_BOS, llama3)) and bos is not None
    add_eos = bool(meta.get(Keys.Tokenizer.ADD_EOS, False)) and eos is not None
    if add_bos or add_eos:
        head, tail = [bos] if add_bos else [], [eos] if add_eos else []
        special = sorted({(bos, meta[Keys.Tokenizer.BOS_ID])} if add_bos else set()
                         | ({(eos, meta[Keys.Tokenizer.EOS_ID])} if add_eos else set()))
        tok.post_processor = processors.TemplateProcessing(
            single=head + ["$A"] + tail, pair=head + ["$A", "$B"] + tail, special_tokens=special)
    arch = meta.get(Keys.General.ARCHITECTURE)
    context = meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) if arch else None
    extra = {"model_max_length": context} if context else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                  unk_token=token(Keys.Tokenizer.UNK_ID), pad_token=token(Keys.Tokenizer.PAD_ID),
                                  clean_up_tokenization_spaces=False, **extra)
    if isinstance(meta.get(Keys.Tokenizer.CHAT_TEMPLATE), str):
        out.chat_template = meta[Keys.Tokenizer.CHAT_TEMPLATE]
    return out
