"""GGUF metadata: config -> llama.cpp keys -> config, and the byte-level BPE tokenizer round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import (MODEL_ARCH, MODEL_ARCH_NAMES, ExpertGatingFuncType, GGUFReader, GGUFValueType, GGUFWriter, Keys,
                  LlamaFileType, RopeScalingType, TokenType)

from ktcore.errors import KtError
from ktcore.formats.gguf_meta import (LLAMA3_REGEX, QWEN2_REGEX, add_model_metadata, add_tokenizer_metadata,
                                      config_from_metadata, pretokenizer_name, tokenizer_from_metadata)
from ktcore.formats.gguf_names import gguf_arch, gguf_plan
from ktcore.formats.gguf_read import read_metadata
from ktcore.models.presets import ARCHITECTURES, make_config

TEXTS = ["hello world, this is a test.", "def foo(x):\n    return x + 1\n", "  leading   spaces\t\ttabs\n\n\n",
         "numbers 1 22 333 4444 55555 3.14", "ünïcødé ✓ 🚀 你好 Привет",
         "I've been 'told' he's there, WE'LL see",
         "<|bos|>inline <|eos|> specials <tool>", ""]
CORPUS = ["hello world, this is a test. " * 5, "def foo(x):\n    return x + 1\n" * 3, "numbers 1 22 333 4444",
          "I've been told he's there, we'll see", "ünïcødé ✓ 🚀"]


def _tokenizer(pre: str = "gpt-2", add_bos: bool = False, vocab_size: int = 420):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        regex = LLAMA3_REGEX if pre == "llama-bpe" else QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                           special_tokens=[("<|bos|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")


def _write_meta(tmp_path, config=None, tokenizer=None, arch="llama", vocab_size=512, name="meta.gguf") -> dict:
    """Metadata-only GGUF file (no tensors) written and read back through gguf-py."""
    writer = GGUFWriter(tmp_path / name, gguf_arch(config) if config is not None else arch)
    if config is not None:
        add_model_metadata(writer, config, qtype="Q8_0")
    if tokenizer is not None:
        add_tokenizer_metadata(writer, tokenizer, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    reader = GGUFReader(tmp_path / name)
    meta = read_metadata(reader)
    meta["__types__"] = {k: f.types for k, f in reader.fields.items()}
    return meta


def _comparable(config) -> dict:
    d = config.to_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "architectures", "dtype"):
        d.pop(key, None)
    return d


CONFIG_VARIANTS = [(arch, {}) for arch in ARCHITECTURES] + [
    ("deepseek_v3", {"tie_word_embeddings": True}),
    ("deepseek_v2", {"q_lora_rank": 24, "topk_method": "greedy", "n_group": 1, "topk_group": 1}),
    ("qwen3_moe", {"mlp_only_layers": [1], "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                               "original_max_position_embeddings": 256}}),
    ("qwen2_moe", {"norm_topk_prob": True,
                   "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}),
    ("mixtral", {"head_dim": 32}),
]


@pytest.mark.parametrize("arch,overrides", CONFIG_VARIANTS, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_config_round_trip(tmp_path, arch, overrides):
    config = make_config(arch, **overrides)
    meta = _write_meta(tmp_path, config)
    back = config_from_metadata(meta, tensor_names=[s.name for s in gguf_plan(config)])
    assert back.model_type == config.model_type
    assert _comparable(back) == _comparable(config)


def test_deepseek_v3_keys(tmp_path):
    config = make_config("deepseek_v3")
    meta = _write_meta(tmp_path, config)
    arch = MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]
    k = {name: value.format(arch=arch) for name, value in {
        "gating": Keys.LLM.EXPERT_GATING_FUNC, "kv_heads": Keys.Attention.HEAD_COUNT_KV,
        "key": Keys.Attention.KEY_LENGTH, "value": Keys.Attention.VALUE_LENGTH,
        "key_mla": Keys.Attention.KEY_LENGTH_MLA,
        "value_mla": Keys.Attention.VALUE_LENGTH_MLA, "q_lora": Keys.Attention.Q_LORA_RANK,
        "kv_lora": Keys.Attention.KV_LORA_RANK, "rope_dim": Keys.Rope.DIMENSION_COUNT,
        "log_mul": Keys.Rope.SCALING_YARN_LOG_MUL,
        "scaling": Keys.Rope.SCALING_TYPE, "orig": Keys.Rope.SCALING_ORIG_CTX_LEN, "factor": Keys.Rope.SCALING_FACTOR,
        "dense": Keys.LLM.LEADING_DENSE_BLOCK_COUNT, "shared": Keys.LLM.EXPERT_SHARED_COUNT,
        "scale": Keys.LLM.EXPERT_WEIGHTS_SCALE, "norm": Keys.LLM.EXPERT_WEIGHTS_NORM,
        "groups": Keys.LLM.EXPERT_GROUP_COUNT,
        "groups_used": Keys.LLM.EXPERT_GROUP_USED_COUNT, "ff_exp": Keys.LLM.EXPERT_FEED_FORWARD_LENGTH,
        "eps": Keys.Attention.LAYERNORM_RMS_EPS}.items()}
    assert meta[Keys.General.ARCHITECTURE] == arch
    assert meta[Keys.General.FILE_TYPE] == LlamaFileType.MOSTLY_Q8_0
    assert meta[k["gating"]] == ExpertGatingFuncType.SIGMOID
    assert meta[k["kv_heads"]] == 1  # MLA as MQA over the latent
    assert (meta[k["key"]], meta[k["value"]]) == (32 + 8, 32)
    assert (meta[k["key_mla"]], meta[k["value_mla"]], meta[k["rope_dim"]]) == (24, 16, 8)
    assert (meta[k["q_lora"]], meta[k["kv_lora"]], meta[k["dense"]], meta[k["shared"]]) == (48, 32, 1, 1)
    assert meta[k["scaling"]] == RopeScalingType.YARN.value and meta[k["orig"]] == 256 and meta[k["factor"]] == 4.0
    assert meta[k["log_mul"]] == pytest.approx(0.1 * 1.0)  # converter convention: 0.1 * mscale_all_dim
    assert meta[k["scale"]] == 2.5 and meta[k["norm"]] is True and meta[k["ff_exp"]] == 32
    assert (meta[k["groups"]], meta[k["groups_used"]]) == (4, 2)
    types = meta["__types__"]  # llama.cpp's get_key checks the GGUF value type
    assert types[k["gating"]] == [GGUFValueType.UINT32] and types[k["eps"]] == [GGUFValueType.FLOAT32]
    assert types[k["norm"]] == [GGUFValueType.BOOL] and types[k["scaling"]] == [GGUFValueType.STRING]


def test_deepseek_v2_keys(tmp_path):
    meta = _write_meta(tmp_path, make_config("deepseek_v2"))
    arch = MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]
    assert meta[Keys.LLM.EXPERT_GATING_FUNC.format(arch=arch)] == ExpertGatingFuncType.SOFTMAX
    assert meta[Keys.Attention.Q_LORA_RANK.format(arch=arch)] == 0  # plain q_proj; the loader requires the key
    assert Keys.Rope.SCALING_TYPE.format(arch=arch) not in meta


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_gqa_keys(tmp_path, arch):
    config = make_config(arch)
    meta = _write_meta(tmp_path, config)
    name = gguf_arch(config)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert meta[Keys.Attention.HEAD_COUNT_KV.format(arch=name)] == 2
    assert meta[Keys.Attention.KEY_LENGTH.format(arch=name)] == hd == meta[Keys.Rope.DIMENSION_COUNT.format(arch=name)]
    assert meta[Keys.LLM.EXPERT_COUNT.format(arch=name)] == (8 if arch == "mixtral" else 16)
    assert meta[Keys.Rope.FREQ_BASE.format(arch=name)] == config.rope_parameters["rope_theta"]
    if arch == "qwen2_moe":
        assert meta[Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=name)] == 64


def test_deepseek_version_from_gating_or_bias():
    meta = {Keys.General.ARCHITECTURE: "deepseek2"}
    from ktcore.formats.gguf_meta import model_type_of

    assert model_type_of(meta, ["blk.1.exp_probs_b.bias"]) == "deepseek_v3"
    assert model_type_of(meta, ["blk.1.ffn_gate_inp.weight"]) == "deepseek_v2"


@pytest.mark.parametrize("arch,expert_count,match", [("bloom", 0, "'bloom' is not supported"),
                                                     ("llama", 0, "llama without experts")])
def test_unsupported_architecture(arch, expert_count, match):
    meta = {Keys.General.ARCHITECTURE: arch, Keys.LLM.EXPERT_COUNT.format(arch=arch): expert_count}
    with pytest.raises(KtError, match=match):
        config_from_metadata(meta, source="x.gguf")


def test_missing_key_is_named():
    meta = {Keys.General.ARCHITECTURE: "qwen3moe", Keys.LLM.BLOCK_COUNT.format(arch="qwen3moe"): 2,
            Keys.LLM.VOCAB_SIZE.format(arch="qwen3moe"): 512}
    with pytest.raises(KtError, match="x.gguf: metadata key 'qwen3moe.embedding_length' is missing"):
        config_from_metadata(meta, source="x.gguf")


def test_unencodable_rope_type():
    config = make_config("qwen3_moe", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(KtError, match="dynamic"):
        add_model_metadata(GGUFWriter(None, "qwen3moe"), config)


# ------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_round_trip(tmp_path, pre, add_bos):
    tok = _tokenizer(pre, add_bos)
    meta = _write_meta(tmp_path, tokenizer=tok, vocab_size=512)
    assert meta[Keys.Tokenizer.MODEL] == "gpt2" and meta[Keys.Tokenizer.PRE] == pre
    assert meta[Keys.Tokenizer.ADD_BOS] is add_bos
    back = tokenizer_from_metadata(meta)
    for text in TEXTS:
        ids = tok.encode(text)
        assert back.encode(text) == ids, text
        assert back.decode(ids) == tok.decode(ids)
    assert (back.bos_token_id, back.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert back.convert_ids_to_tokens(list(range(300))) == tok.convert_ids_to_tokens(list(range(300)))


def test_tokenizer_metadata_layout(tmp_path):
    tok = _tokenizer()
    meta = _write_meta(tmp_path, tokenizer=tok, vocab_size=512)
    tokens, types = meta[Keys.Tokenizer.LIST], meta[Keys.Tokenizer.TOKEN_TYPE]
    n = len(tok)
    assert len(tokens) == len(types) == 512  # padded to the model's vocab_size, like the converter
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 512)] and set(types[n:]) == {TokenType.UNUSED}
    assert types[0] == types[1] == TokenType.CONTROL and tokens[:2] == ["<|bos|>", "<|eos|>"]
    assert types[tokens.index("<tool>")] == TokenType.USER_DEFINED
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert meta[Keys.Tokenizer.MERGES] == [" ".join(m) for m in spec["merges"]]
    assert (meta[Keys.Tokenizer.BOS_ID], meta[Keys.Tokenizer.EOS_ID]) == (0, 1)


def test_tokenizer_larger_than_vocab(tmp_path):
    with pytest.raises(KtError, match="beyond the model's vocab_size 100"):
        _write_meta(tmp_path, tokenizer=_tokenizer(), vocab_size=100)


def test_unknown_pretokenizer():
    with pytest.raises(KtError, match="no known llama.cpp equivalent"):
        pretokenizer_name({"type": "Whitespace"})
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pretokenizer_name(gpt2) == "gpt-2"


def test_unsupported_tokenizer_model():
    with pytest.raises(KtError, match="tokenizer model 'llama'"):
        tokenizer_from_metadata({Keys.Tokenizer.MODEL: "llama"}, source="x.gguf")
    with pytest.raises(KtError, match="pre-tokenizer 'falcon'"):
        tokenizer_from_metadata({Keys.Tokenizer.MODEL: "gpt2", Keys.Tokenizer.PRE: "falcon"})


def test_float_keys_round_to_config_values(tmp_path):
    config = make_config("deepseek_v2", rms_norm_eps=1e-5, routed_scaling_factor=16.0)
    meta = _write_meta(tmp_path, config)
    assert meta[Keys.Attention.LAYERNORM_RMS_EPS.format(arch="deepseek2")] != 1e-5  # stored as float32
    back = config_from_metadata(meta, tensor_names=[s.name for s in gguf_plan(config)])
    assert back.rms_norm_eps == 1e-5 and back.routed_scaling_factor == 16.0
    assert np.float32(back.rms_norm_eps) == np.float32(1e-5)


def test_ktcore_trained_tokenizer_round_trip(tmp_path, monkeypatch):
    """The tokenizer ktcore trains for its synthetic models (GPT-2 regex, BOS added, reserved ids)."""
    tokenizer_module = pytest.importorskip("ktcore.models.tokenizer")
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path / "cache"))
    config = make_config("qwen3_moe")
    tok = tokenizer_module.build_tokenizer(config)
    meta = _write_meta(tmp_path, config, tok, vocab_size=config.vocab_size)
    assert meta[Keys.Tokenizer.PRE] == tokenizer_module.LLAMA_CPP_PRE
    back = tokenizer_from_metadata(meta)
    for text in TEXTS + [open(json.__file__, encoding="utf-8").read()]:
        assert back.encode(text) == tok.encode(text)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.pad_token_id)
