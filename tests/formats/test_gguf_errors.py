"""Bad GGUF input: each case is one ``WeightError``/``KtError`` naming the file (and the tensor)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys

from ktcore.errors import KtError, WeightError
from ktcore.formats.store import canonical_from_hf
from ktcore.formats.gguf_read import GGUFStore, config_from_gguf, read_gguf_metadata, tokenizer_from_gguf
from ktcore.formats.gguf_write import write_gguf
from ktcore.models.presets import make_config


@functools.lru_cache(maxsize=None)
def _weights(arch: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = make_config(arch, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    return config, {k: torch.randn(v.shape, generator=gen) for k, v in canonical_from_hf(model.state_dict())}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    config, tensors = _weights("qwen3_moe")
    return write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", config, None, tensors.items(), "Q8_0")[0]


def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop: tuple[str, ...] = (),
             replace: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None) -> Path:
    """Copies a GGUF through gguf-py, dropping or replacing tensors (raw data and type)."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch or reader.fields[Keys.General.ARCHITECTURE].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE:
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data, kind = (replace or {}).get(t.name, (t.data, t.tensor_type))
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _cut(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    reader = GGUFReader(good)
    info_at = data.index(b"blk.1.attn_norm.weight")  # inside the tensor-info table
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    last = reader.tensors[-1]
    cases = [
        (0, "file is empty"),
        (3, "truncated in the header"),
        (20, "truncated in the header"),
        (40, "truncated in metadata"),
        (info_at + 10, "truncated in tensor info #"),  # in the name
        (info_at + 22 + 6, "truncated in the tensor info of 'blk.1.attn_norm.weight'"),  # in its dimensions
        (embd.data_offset + 5, "tensor 'token_embd.weight' is truncated"),
        (len(data) - 1, f"tensor '{last.name}' is truncated"),
    ]
    for size, match in cases:
        cut = _cut(good, tmp_path / f"cut{size}.gguf", size)
        with pytest.raises(WeightError, match=match) as err:
            GGUFStore(cut)
        assert str(cut) in str(err.value)
    with pytest.raises(WeightError, match="truncated"):
        config_from_gguf(_cut(good, tmp_path / "c.gguf", 40))
    with pytest.raises(WeightError, match="truncated"):
        tokenizer_from_gguf(_cut(good, tmp_path / "t.gguf", 40))


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(WeightError, match="x.gguf: not a GGUF file"):
        GGUFStore(tmp_path / "x.gguf")
    with pytest.raises(WeightError, match="no such GGUF file"):
        GGUFStore(tmp_path / "missing.gguf")


def test_missing_tensor(good, tmp_path):
    bad = _rewrite(good, tmp_path / "bad.gguf", drop=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(WeightError, match="bad.gguf: tensor 'blk.1.ffn_up_exps.weight' is missing"):
        GGUFStore(bad)


def test_shape_disagrees_with_own_metadata(good, tmp_path):
    wrong = np.zeros((48, 64), dtype=np.float32)  # attn_v of 48 rows: 3 kv heads instead of 2
    bad = _rewrite(good, tmp_path / "bad.gguf", replace={"blk.2.attn_v.weight": (wrong, GGMLQuantizationType.F32)})
    with pytest.raises(WeightError, match=r"bad.gguf: tensor 'blk.2.attn_v.weight' has shape \[48, 64\], "
                                          r"the config \(qwen3_moe\) expects \[32, 64\]"):
        GGUFStore(bad)


def test_shape_disagrees_with_given_config(good):
    config = make_config("qwen3_moe", moe_intermediate_size=64)
    with pytest.raises(WeightError, match="good.gguf: tensor 'blk.0.ffn_gate_exps.weight' has shape"):
        GGUFStore(good, config=config)
    with pytest.raises(WeightError, match="architecture is 'qwen3moe', the config \\(mixtral\\) needs 'llama'"):
        GGUFStore(good, config=make_config("mixtral"))


def test_unsupported_architecture(good, tmp_path):
    bad = _rewrite(good, tmp_path / "bad.gguf", arch="bloom")
    with pytest.raises(WeightError, match="bad.gguf: GGUF architecture 'bloom' is not supported"):
        GGUFStore(bad)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.TQ1_0])
def test_unsupported_quant_type(tmp_path, kind):
    config, tensors = _weights("qwen3_moe", hidden_size=256)  # rows of 256: whole IQ2/TQ1 blocks
    good = write_gguf(tmp_path / "good.gguf", config, None, tensors.items(), "Q8_0")[0]
    block, size = GGML_QUANT_SIZES[kind]
    raw = np.random.default_rng(0).integers(0, 256, (512, 256 // block * size), dtype=np.uint8)
    bad = _rewrite(good, tmp_path / "bad.gguf", replace={"token_embd.weight": (raw, kind)})
    with pytest.raises(WeightError, match=f"bad.gguf: tensor 'token_embd.weight' has GGUF type {kind.name}"):
        GGUFStore(bad)


def test_unknown_type_id(good, tmp_path):
    data = bytearray(good.read_bytes())
    at = data.index(b"output_norm.weight") + len(b"output_norm.weight")
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(WeightError, match="tensor 'output_norm.weight' has unknown GGML type id 250"):
        GGUFStore(tmp_path / "bad.gguf")


def test_split_set_with_a_missing_part(tmp_path):
    config, tensors = _weights("qwen3_moe")
    paths = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q8_0", split_max_bytes=120_000)
    assert len(paths) >= 3
    paths[1].unlink()
    for given in (paths[0], paths[-1]):
        with pytest.raises(WeightError, match=f"{paths[1].name}: part 2 of the {len(paths)}-part GGUF .* is missing"):
            GGUFStore(given)


def test_split_part_renamed(tmp_path):
    config, tensors = _weights("qwen3_moe")
    paths = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q8_0", split_max_bytes=120_000)
    lone = shutil.copy(paths[0], tmp_path / "lone.gguf")
    with pytest.raises(WeightError, match="lone.gguf: file is part 1 of a"):
        GGUFStore(lone)
    swapped = tmp_path / "swap"
    swapped.mkdir()
    n = len(paths)
    for i, p in enumerate(paths):  # parts 1 and 2 exchanged
        j = {0: 1, 1: 0}.get(i, i)
        shutil.copy(p, swapped / f"m-{j + 1:05d}-of-{n:05d}.gguf")
    with pytest.raises(WeightError, match="split metadata says part 1 of"):
        GGUFStore(swapped / f"m-00001-of-{n:05d}.gguf")


def test_metadata_without_tokenizer(good):
    assert read_gguf_metadata(good)[Keys.General.ARCHITECTURE] == "qwen3moe"
    with pytest.raises(KtError, match="tokenizer model None is not supported"):
        tokenizer_from_gguf(good)
