"""The fast random-block GGUF writer (``ktcore.formats.random_gguf``): valid blocks of every
supported type at the intended scale, files that gguf-py and ktcore's loader read back with
the planned names, types and shapes, deterministic bytes, and write_gguf_blocks' checks."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys, LlamaFileType
from gguf.quants import dequantize

import ktcore
from ktcore.errors import KtError, WeightError
from ktcore.formats import random_gguf
from ktcore.formats.gguf_names import gguf_plan
from ktcore.formats.gguf_write import write_gguf_blocks
from ktcore.formats.q4_k_m import q4_k_m_types
from ktcore.formats.random_gguf import SCALE_FIELDS, random_blocks, random_tensor, write_random_gguf
from ktcore.models.presets import make_config
from ktcore.models.synth import canonical_tensors
from ktcore.models.tokenizer import build_tokenizer

#: Odd small configs: tiny rows (Q5_0/Q8_0/F16 fallbacks), 256-multiples (real Q4_K/Q6_K), MLA's k_b/v_b.
CONFIGS = {
    "qwen3_moe-tiny-3L": lambda: make_config("qwen3_moe", "tiny", layers=3),
    "qwen3_moe-256-2L": lambda: make_config("qwen3_moe", "tiny", layers=2, hidden_size=256, moe_intermediate_size=256,
                                            vocab_size=300),
    "deepseek_v2-tiny-2L": lambda: make_config("deepseek_v2", "tiny", layers=2),
}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("qtype", [*SCALE_FIELDS, "F16", "F32"])
@pytest.mark.parametrize("shape", [(256, 256), (7, 6, 1536)])
def test_random_tensor_is_valid_at_scale(qtype, shape):
    std = 0.02
    with ThreadPoolExecutor(2) as pool:
        data = random_tensor(qtype, shape, std, seed=1, name="t", pool=pool)
    assert data.dtype == np.uint8 and data.ndim == 1
    values = dequantize(data, GGMLQuantizationType[qtype]).reshape(-1)  # [numel]
    assert values.size == np.prod(shape) and np.isfinite(values).all()
    rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    assert rms == pytest.approx(std, rel=0.25), rms  # ~250 blocks; code_rms is measured on 4096
    assert abs(values.mean()) < 0.5 * std


def test_random_tensor_rejects_what_it_cannot_make():
    with pytest.raises(KtError, match="not supported"):
        random_tensor("BF16", (2, 32), 1.0)
    with pytest.raises(KtError, match="zero-mean"):
        random_tensor("Q4_K", (2, 256), 0.05, mean=1.0)


def test_chunks_threads_and_seeds(monkeypatch):
    """Bytes depend on the seed and the name, never on the thread count."""
    monkeypatch.setattr(random_gguf, "CHUNK_BLOCKS", 3)  # several chunks in a small tensor
    one = random_tensor("Q6_K", (8, 512), 0.1, seed=0, name="a")
    with ThreadPoolExecutor(3) as pool:
        three = random_tensor("Q6_K", (8, 512), 0.1, seed=0, name="a", pool=pool)
    assert np.array_equal(one, three)
    assert not np.array_equal(one, random_tensor("Q6_K", (8, 512), 0.1, seed=1, name="a"))
    assert not np.array_equal(one, random_tensor("Q6_K", (8, 512), 0.1, seed=0, name="b"))


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_file_reads_back_as_planned(tmp_path, which):
    config = CONFIGS[which]()
    types = q4_k_m_types(config)
    path = write_random_gguf(tmp_path / "m.gguf", config, build_tokenizer(config), types, seed=0, threads=2)[0]
    reader = GGUFReader(path)
    assert reader.fields[Keys.General.FILE_TYPE].contents() == LlamaFileType.MOSTLY_Q4_K_M
    assert len(reader.fields[Keys.Tokenizer.LIST].contents()) == config.vocab_size
    plan = {s.name: s for s in gguf_plan(config)}
    infos = canonical_tensors(config)
    assert [t.name for t in reader.tensors] == list(plan)
    for t in reader.tensors:
        spec = plan[t.name]
        assert t.tensor_type.name == types[t.name], t.name
        assert tuple(int(d) for d in reversed(t.shape)) == spec.shape, t.name
        values = dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), t.name
        info = infos[spec.source]
        if values.size >= 4096:  # enough blocks for the scale to show
            assert float(values.std()) == pytest.approx(info.std, rel=0.2), t.name
    if which == "qwen3_moe-256-2L":
        assert {"Q4_K", "Q6_K", "F32"} <= set(types.values())
    if which == "deepseek_v2-tiny-2L":
        assert types["blk.1.attn_k_b.weight"] == "F16"  # 16-value rows: no block type fits


def test_same_seed_same_file(tmp_path):
    config = CONFIGS["qwen3_moe-tiny-3L"]()
    types, tok = q4_k_m_types(config), build_tokenizer(config)
    a = write_random_gguf(tmp_path / "a.gguf", config, tok, types, seed=3, threads=1)[0]
    b = write_random_gguf(tmp_path / "b.gguf", config, tok, types, seed=3, threads=2)[0]
    c = write_random_gguf(tmp_path / "c.gguf", config, tok, types, seed=4, threads=2)[0]
    assert _sha(a) == _sha(b) != _sha(c)


def test_loads_and_runs_with_finite_logits(tmp_path):
    """The real loader reads the file (config and tokenizer from its metadata) and a forward
    through every layer stays finite, with logits spread over a few units."""
    config = make_config("qwen3_moe", "tiny", layers=3)
    path = write_random_gguf(tmp_path / "m.gguf", config, build_tokenizer(config), q4_k_m_types(config))[0]
    model = ktcore.load(gguf=path, rules="qwen3_moe-cpu", max_seq_len=64)
    assert model.config.num_hidden_layers == 3 and model.tokenizer is not None
    logits = model.logits(torch.arange(3, 40))  # [37, vocab]
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 30


def test_write_gguf_blocks_checks_what_it_is_given(tmp_path):
    config = CONFIGS["qwen3_moe-tiny-3L"]()
    types = q4_k_m_types(config)
    blocks = list(random_blocks(config, types, threads=1))
    with pytest.raises(KtError, match="type plan does not cover"):
        write_gguf_blocks(tmp_path / "m.gguf", config, None, {**types, "extra.weight": "F32"}, iter(blocks), "Q4_K")
    bad = [
        (blocks[:-1], "'output.weight' were not given"),
        (blocks + blocks[:1], "given twice"),
        (blocks + [("blk.9.attn_q.weight", blocks[0][1])], "not a tensor of this file"),
        ([(blocks[0][0], blocks[0][1][:-2])] + blocks[1:], "bytes given"),
    ]
    for given, message in bad:
        with pytest.raises(WeightError, match=message):
            write_gguf_blocks(tmp_path / "m.gguf", config, None, types, iter(given), "Q4_K")
        assert not (tmp_path / "m.gguf").exists()  # nothing left behind
