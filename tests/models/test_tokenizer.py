"""The byte-level BPE tokenizer trained on the standard library's sources."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ktcore.errors import KtError
from ktcore.models import tokenizer as tk
from ktcore.models.presets import ARCHITECTURES, make_config

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Grüße, naïve café — 東京 🙂\ttabs\r\nand CRLF",
    "   leading spaces and trailing   ",
    "<|bos|> is special, <|eos|> too",
    "",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path_factory.getbasetemp() / "ktcore-cache"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_presets_get_a_tokenizer_of_their_vocab_size(arch):
    config = make_config(arch)
    tok = tk.build_tokenizer(config)
    assert len(tok) == config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == tk.SPECIAL_TOKENS
    assert tok.model_max_length == config.max_position_embeddings


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_bos(text):
    tok = tk.build_tokenizer(tk.TokenizerSpec(512))
    ids = tok(text)["input_ids"]
    assert ids[0] == tk.BOS_ID
    assert tok.decode(ids[1:]) == text
    if "<|" not in text:
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert all(0 <= i < 512 for i in ids)


def test_learned_merges_compress_python_code():
    tok = tk.build_tokenizer(tk.TokenizerSpec(4096))
    code = Path(sysconfig.get_paths()["stdlib"], "heapq.py").read_text(encoding="utf-8")[:8000]
    ids = tok(code, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(code.encode()) / 3  # real merges, not bytes
    assert len(tok("    def __init__(self):", add_special_tokens=False)["input_ids"]) < 10


def test_special_tokens_are_atomic():
    tok = tk.build_tokenizer(tk.TokenizerSpec(512))
    assert tok("<|eos|>", add_special_tokens=False)["input_ids"] == [tk.EOS_ID]


def test_large_vocab_is_filled_with_reserved_special_tokens():
    raw = tk.train_bpe(20000)
    assert raw.get_vocab_size() == 20000
    learned = raw.token_to_id("<|reserved_0|>")
    assert 1000 < learned < 20000
    assert raw.token_to_id(f"<|reserved_{20000 - learned - 1}|>") == 19999
    assert raw.encode("<|reserved_5|>", add_special_tokens=False).ids == [learned + 5]


def test_training_is_deterministic_across_processes():
    here = hashlib.sha256(tk.train_bpe(700).to_str().encode()).hexdigest()
    code = ("import hashlib; from ktcore.models.tokenizer import train_bpe; "
            "print(hashlib.sha256(train_bpe(700).to_str().encode()).hexdigest())")
    env = dict(os.environ, RAYON_NUM_THREADS="1", PYTHONHASHSEED="123",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_cache_is_keyed_by_size_and_corpus_and_survives_damage(tmp_path, caplog):
    tk.cached_bpe(600, tmp_path)
    (path,) = (tmp_path / "tokenizers").glob("*.json")
    assert "-600-" in path.name and tk.corpus_fingerprint()[:16] in path.name
    first = path.read_text()
    path.write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="ktcore.models.tokenizer"):
        again = tk.cached_bpe(600, tmp_path)
    assert "unreadable" in caplog.text
    assert again.to_str() == first and path.read_text() == first


def test_corpus_modules_exist_on_this_python():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    missing = [m for m in tk.CORPUS_MODULES if not (stdlib / f"{m}.py").is_file()]
    assert not missing
    assert len(tk.corpus_texts()) == len(tk.CORPUS_MODULES)
    assert sum(map(len, tk.corpus_texts())) > 200_000


@pytest.mark.parametrize("size", [0, 100, 258])
def test_too_small_vocab_is_a_user_error(size):
    with pytest.raises(KtError, match="too small"):
        tk.TokenizerSpec(size)


def test_saved_files_load_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = tk.build_tokenizer(tk.TokenizerSpec(512, model_max_length=777))
    paths = tk.save_tokenizer(tok, tmp_path)
    assert sorted(p.name for p in paths) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["ktcore_corpus_sha256"] == tk.corpus_fingerprint()
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (0, 1, 2, 512)
    assert loaded.model_max_length == 777
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    # the same tokenizer saved twice gives the same bytes
    again = tmp_path / "again"
    tk.save_tokenizer(tk.build_tokenizer(tk.TokenizerSpec(512, model_max_length=777)), again)
    for p in paths:
        assert (again / p.name).read_bytes() == p.read_bytes()
