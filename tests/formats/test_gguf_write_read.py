"""Write tiny models as GGUF (F32, BF16, Q8_0, fallbacks, splits), read them back with GGUFStore;
and read what llama.cpp's own converter writes (``KT_LLAMACPP_SRC``)."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys
from gguf.quants import dequantize, quantize

from ktcore.errors import KtError, WeightError
from ktcore.formats.gguf_names import gguf_plan
from ktcore.formats.store import canonical_from_hf
from ktcore.formats.gguf_read import GGUFStore, config_from_gguf, tokenizer_from_gguf
from ktcore.formats.gguf_write import write_gguf
from ktcore.formats.store import WeightStore
from ktcore.models.presets import ARCHITECTURES, make_config
from ktcore.ops.weights import DenseWeight, GGUFWeight

TEXTS = ["hello world, this is a test.", "def foo(x):\n    return x + 1\n", "ünïcødé 🚀 3.14 <|eos|>"]


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, this is a test. " * 5, "def foo(x):\n    return x + 1\n" * 3], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")


@functools.lru_cache(maxsize=None)
def _weights(arch: str, **overrides) -> tuple[object, dict[str, torch.Tensor]]:
    """Config and random canonical tensors for every parameter of the transformers model."""
    from transformers import AutoModelForCausalLM

    config = make_config(arch, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(len(arch))
    state = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in model.state_dict().items()}
    return config, dict(canonical_from_hf(state))


def _q(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a GGUF of ``qtype`` stores for ``x``, dequantised (gguf.quants is the reference)."""
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.half().float()
    if qtype == "BF16":
        return x.to(torch.bfloat16).float()
    kind = GGMLQuantizationType[qtype]
    return torch.from_numpy(dequantize(quantize(x.float().numpy(), kind), kind)).reshape(x.shape)


def _expected(config, name: str, x: torch.Tensor, types: dict[str, str]) -> torch.Tensor:
    """Canonical tensor after the round trip: per GGUF tensor's stored type (kv_b: through k_b/v_b)."""
    specs = [s for s in gguf_plan(config) if s.source == name]
    if len(specs) == 1:  # copy / row permutation: quantisation is per row, rows move whole
        return _q(x, types[specs[0].name])
    k_spec, v_spec = specs
    nH, (nope, v) = k_spec.heads, k_spec.split
    kv = x.reshape(nH, nope + v, -1)
    k_b = _q(kv[:, :nope].transpose(1, 2).contiguous(), types[k_spec.name])  # [nH, R, nope]
    v_b = _q(kv[:, nope:].contiguous(), types[v_spec.name])
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(x.shape)


def _file_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0"])
def test_write_read_round_trip(tmp_path, arch, qtype):
    config, tensors = _weights(arch)
    paths = write_gguf(tmp_path / "m.gguf", config, _tokenizer(), tensors.items(), qtype)
    assert paths == [tmp_path / "m.gguf"]
    types = _file_types(paths[0])
    store = GGUFStore(paths[0])
    assert isinstance(store, WeightStore)
    assert sorted(store.names()) == sorted(tensors)
    for spec in gguf_plan(config):  # stored types follow llama.cpp's rules
        want = "F32" if spec.keep_f32 or qtype == "F32" else qtype
        if want == "Q8_0" and spec.shape[-1] % 32:
            want = "F16"  # not a whole number of Q8_0 blocks
        assert types[spec.name] == want, spec.name
    for name, x in tensors.items():
        weight = store.get(name)
        assert store.shape(name) == tuple(x.shape) == weight.shape
        # F32 exact; BF16 the bf16-rounded values; Q8_0 gguf.quants' dequantize(quantize(x))
        assert torch.equal(weight.to_dense(torch.float32), _expected(config, name, x, types)), name
        if qtype == "Q8_0" and types.get(next(s.name for s in gguf_plan(config) if s.source == name)) == "Q8_0" \
                and not name.endswith("kv_b_proj.weight"):
            assert isinstance(weight, GGUFWeight) and weight.qtype == "Q8_0"
    back = config_from_gguf(paths[0])
    drop = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "architectures", "dtype")
    assert {k: v for k, v in back.to_dict().items() if k not in drop} == \
        {k: v for k, v in config.to_dict().items() if k not in drop}
    assert (back.bos_token_id, back.eos_token_id) == (0, 1)  # from the tokenizer


def test_in_place_reads_are_zero_copy_views_of_the_map(tmp_path):
    config, tensors = _weights("qwen3_moe")
    path = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q8_0")[0]
    store = GGUFStore(path, in_place=True)
    a, b = store.get("model.layers.0.mlp.experts.gate"), store.get("model.layers.0.mlp.experts.gate")
    assert isinstance(a, GGUFWeight) and a.data.data_ptr() == b.data.data_ptr()
    norm = store.get("model.norm.weight")
    assert isinstance(norm, DenseWeight) and norm.tensor.dtype == torch.float32
    assert norm.tensor.data_ptr() == store.get("model.norm.weight").tensor.data_ptr()
    with pytest.raises(WeightError, match="no tensor 'model.layers.9.mlp.gate.weight'"):
        store.get("model.layers.9.mlp.gate.weight")


def test_default_reads_are_fresh_copies_equal_to_the_map(tmp_path):
    config, tensors = _weights("qwen3_moe")
    path = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q8_0")[0]
    mapped, copied = GGUFStore(path, in_place=True), GGUFStore(path)
    for name in ("model.layers.0.mlp.experts.gate", "model.norm.weight", "model.layers.1.self_attn.q_proj.weight"):
        a, b = mapped.get(name), copied.get(name)
        raw_a, raw_b = (a.data, b.data) if isinstance(a, GGUFWeight) else (a.tensor, b.tensor)
        assert raw_a.data_ptr() != raw_b.data_ptr()
        assert torch.equal(raw_a, raw_b)


def test_tokenizer_round_trip(tmp_path):
    config, tensors = _weights("mixtral")
    path = write_gguf(tmp_path / "m.gguf", config, _tokenizer(), tensors.items(), "F32")[0]
    back = tokenizer_from_gguf(path)
    for text in TEXTS:
        assert back.encode(text) == _tokenizer().encode(text)


def test_split_files(tmp_path):
    config, tensors = _weights("deepseek_v3")
    single = write_gguf(tmp_path / "one.gguf", config, _tokenizer(), tensors.items(), "Q8_0")[0]
    limit = 60_000
    paths = write_gguf(tmp_path / "m.gguf", config, _tokenizer(), reversed(list(tensors.items())), "Q8_0",
                       split_max_bytes=limit)
    n = len(paths)
    assert n > 2 and [p.name for p in paths] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    total = 0
    for i, part in enumerate(paths):
        reader = GGUFReader(part)
        assert reader.fields[Keys.Split.LLM_KV_SPLIT_NO].contents() == i
        assert reader.fields[Keys.Split.LLM_KV_SPLIT_COUNT].contents() == n
        assert reader.fields[Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT].contents() == len(gguf_plan(config))
        data = sum(t.n_bytes for t in reader.tensors)
        assert data <= limit or len(reader.tensors) == 1
        total += len(reader.tensors)
    assert total == len(gguf_plan(config))
    ref = GGUFStore(single)
    for part in (paths[0], paths[-1]):  # any part opens the whole set
        store = GGUFStore(part)
        assert store.names() == ref.names()
        for name in store.names():
            assert torch.equal(store.get(name).to_dense(torch.float32), ref.get(name).to_dense(torch.float32))


def test_fallback_types(tmp_path, caplog):
    config, tensors = _weights("deepseek_v3")
    with caplog.at_level(logging.INFO, logger="ktcore.formats.gguf_write"):
        path = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q4_K")[0]
    types = _file_types(path)
    # llama-quant.cpp: Q4_K -> Q5_0 when ne[0] % 256 != 0, then F16 when ne[0] % 32 != 0
    assert types["blk.1.ffn_down_exps.weight"] == "Q5_0"  # 32 columns
    assert types["token_embd.weight"] == "Q5_0"  # 64 columns
    assert types["blk.0.attn_k_b.weight"] == "F16"  # 16 columns (qk_nope_head_dim)
    assert types["blk.0.attn_q_b.weight"] == "F16"  # 48 columns (q_lora_rank)
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert "required fallback quantization" in caplog.text and "blk.0.attn_k_b.weight" in caplog.text
    store = GGUFStore(path)
    assert store.gguf_type("model.layers.1.mlp.experts.down") == "Q5_0"
    for name, x in tensors.items():
        assert torch.equal(store.get(name).to_dense(torch.float32), _expected(config, name, x, types)), name


@pytest.mark.parametrize("qtype,fallback", [("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0")])
def test_k_quant_fallbacks(tmp_path, qtype, fallback):
    config, tensors = _weights("qwen2_moe")
    types = _file_types(write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), qtype)[0])
    assert types["blk.0.ffn_up_exps.weight"] == fallback and types["blk.0.attn_q.bias"] == "F32"


def test_k_quant_rows_are_written_as_k_quants(tmp_path):
    """Rows of 256: no fallback; ktcore's own K-quant quantiser writes the Q4_K blocks."""
    config, tensors = _weights("qwen3_moe", hidden_size=256)
    path = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q4_K")[0]
    assert _file_types(path)["token_embd.weight"] == "Q4_K"


def test_unquantisable_values_leave_no_file_behind(tmp_path):
    config, tensors = _weights("qwen3_moe", hidden_size=256)
    tensors["model.layers.0.mlp.experts.gate"][0, 0, 0] = float("nan")  # rows of 256: a Q4_K tensor
    with pytest.raises(KtError, match="ffn_gate_exps.*cannot quantise non-finite values to Q4_K"):
        write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q4_K")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0"])
def test_writing_streams_one_tensor_at_a_time(tmp_path, qtype):
    """Host memory while writing stays around one tensor, not the model (tracemalloc sees numpy)."""
    import tracemalloc

    from ktcore.formats.gguf_names import canonical_shapes

    config = make_config("qwen3_moe", hidden_size=256, num_hidden_layers=4)
    shapes = canonical_shapes(config)
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    assert total > 10 * largest
    lazy = ((name, torch.randn(shape)) for name, shape in shapes.items())  # made one by one
    tracemalloc.start()
    try:
        write_gguf(tmp_path / "m.gguf", config, None, lazy, qtype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * largest


def test_write_errors_leave_nothing(tmp_path):
    config, tensors = _weights("mixtral")
    items = list(tensors.items())
    cases = [
        (items[:-1], "'lm_head.weight' were not given"),
        (items + [("model.layers.0.mlp.gate.bias", torch.zeros(8))], "not a tensor of this mixtral model"),
        ([(n, t[:-1] if n == "model.norm.weight" else t) for n, t in items], "has shape \\[63\\]"),
        (items + items[:1], "given twice"),
    ]
    for given, match in cases:
        with pytest.raises(WeightError, match=match):
            write_gguf(tmp_path / "m.gguf", config, None, iter(given), "Q8_0", split_max_bytes=100_000)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(KtError, match="IQ2_XXS"):
        write_gguf(tmp_path / "m.gguf", config, None, items, "IQ2_XXS")


# ------------------------------------------------------------------ llama.cpp's own converter

_DRIVER = textwrap.dedent('''
    """Runs convert_hf_to_gguf.py in-process on several models; see the test for why it is patched."""
    import importlib.machinery, importlib.util, json, runpy, sys, types
    src, pre, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path[:0] = [src, src + "/gguf-py"]  # the converter and its own (newer) gguf-py
    if importlib.util.find_spec("sentencepiece") is None:
        # the llama (Mixtral) vocab path imports sentencepiece before noticing there is no
        # tokenizer.model; a stub lets it fall through to the BPE path as it would with it installed
        stub = types.ModuleType("sentencepiece")
        stub.__spec__, stub.SentencePieceProcessor = importlib.machinery.ModuleSpec("sentencepiece", None), None
        sys.modules["sentencepiece"] = stub
    import conversion.base
    # The converter recognises BPE pre-tokenizers by hashing the tokenization of a test string and
    # refuses unknown ones; our freshly trained tokenizer has no known hash, so declare its name.
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    main = runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="converter")["main"]
    for args in jobs:
        sys.argv = ["convert_hf_to_gguf.py", *args]
        main()
''')

_CAUSAL_LM = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
_OUTTYPE = {"deepseek_v3": "f32", "deepseek_v2": "q8_0", "qwen3_moe": "f32", "qwen2_moe": "q8_0", "mixtral": "bf16"}


@pytest.mark.skipif(not os.environ.get("KT_LLAMACPP_SRC"),
                    reason="KT_LLAMACPP_SRC (a llama.cpp source tree with convert_hf_to_gguf.py) is not set")
def test_llama_cpp_converter_output(tmp_path):
    from transformers import AutoModelForCausalLM

    src = Path(os.environ["KT_LLAMACPP_SRC"])
    if not (src / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"KT_LLAMACPP_SRC={src} has no convert_hf_to_gguf.py")
    models, jobs = {}, []
    for arch in ARCHITECTURES:
        # DeepSeek-V3's sigmoid gating reaches the GGUF only through config.json's scoring_func
        config = make_config(arch, **({"scoring_func": "sigmoid"} if arch == "deepseek_v3" else {}))
        config.architectures = [_CAUSAL_LM[arch]]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path / arch)
        _tokenizer().save_pretrained(tmp_path / arch)
        models[arch] = model
        jobs.append([str(tmp_path / arch), "--outfile", str(tmp_path / f"{arch}.gguf"), "--outtype", _OUTTYPE[arch]])
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    run = subprocess.run([sys.executable, str(driver), str(src), "gpt-2", json.dumps(jobs)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for arch, model in models.items():
        theirs = tmp_path / f"{arch}.gguf"
        tensors = dict(canonical_from_hf(model.state_dict()))
        store = GGUFStore(theirs)
        assert store.config.model_type == arch and sorted(store.names()) == sorted(tensors)
        types = _file_types(theirs)
        for name, x in tensors.items():
            assert torch.equal(store.get(name).to_dense(torch.float32), _expected(store.config, name, x, types)), \
                (arch, name)
        for text in TEXTS:
            assert tokenizer_from_gguf(theirs).encode(text) == _tokenizer().encode(text)
        # ours, from the same weights: identical tensors (names, types, shapes, bytes), and every
        # key the converter writes with the same value and type (general.name is the directory name)
        ours = write_gguf(tmp_path / f"ours-{arch}.gguf", model.config, _tokenizer(), tensors.items(),
                          _OUTTYPE[arch].upper())[0]
        a, b = GGUFReader(theirs), GGUFReader(ours)
        assert {t.name: (t.tensor_type, t.shape.tolist()) for t in a.tensors} == \
            {t.name: (t.tensor_type, t.shape.tolist()) for t in b.tensors}
        b_data = {t.name: t.data for t in b.tensors}
        for t in a.tensors:
            assert np.array_equal(t.data, b_data[t.name]), (arch, t.name)
        for key, field in a.fields.items():
            if key.startswith("GGUF.") or key == "general.name":
                continue
            assert key in b.fields, (arch, key)
            assert (field.types, field.contents()) == (b.fields[key].types, b.fields[key].contents()), (arch, key)
