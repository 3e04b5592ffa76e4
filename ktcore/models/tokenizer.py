"""A real byte-level BPE tokenizer, trained in a second on text every machine has.

Synthetic models need a tokenizer that behaves like a real one (byte-level BPE with merges,
special tokens, a ``tokenizer.json`` that transformers and llama.cpp's converter read), and
nothing may be downloaded. So ktcore trains one with the ``tokenizers`` library on the
Python standard library's own sources.

Training text
    The files of ``CORPUS_MODULES`` (about 350 kB), read from ``sysconfig.get_paths()["stdlib"]``
    in that fixed order. They were picked as modules that rarely change between Python
    releases (pure algorithms such as ``heapq``/``bisect``/``difflib``, generated tables such as
    ``stringprep``/``html.entities``, long-frozen helpers; nothing deprecated, scheduled for
    removal, or generated per release like ``token``/``keyword``), so that 3.11 (CI) and 3.12
    (the GPU host) read the same text; that is likely but was only checked on 3.11. A bug-fix
    to one of them in some patch release changes the text, so the tokenizer is treated as a
    pure function of the text and the vocabulary size: the SHA-256 of the text
    (``corpus_fingerprint``) keys the cache and is written into ``tokenizer_config.json``
    (``ktcore_corpus_sha256``), so machines whose standard libraries differ get different,
    labelled tokenizers, never different ones under one name. A model directory carries its
    tokenizer, so only regenerating a model can see the difference. A module missing on some
    Python is skipped with a warning (and changes the fingerprint). Training is deterministic
    for a given text (checked across processes and thread counts).

Layout of the vocabulary (``vocab_size`` ids, exactly the config's ``vocab_size``)
    ``0 <|bos|>``, ``1 <|eos|>``, ``2 <|pad|>`` (fixed ids whatever the size, as DeepSeek's
    tokenizers put BOS/EOS first), then the 256 byte tokens and the learned merges. The
    corpus yields about 12k merges; a larger vocabulary is filled with ``<|reserved_N|>``
    special tokens, as real tokenizers reserve ids (Llama 3, DeepSeek-V3).

Pre-tokenisation is GPT-2's regex (``ByteLevel(use_regex=True)``: llama.cpp's ``gpt-2``
pre-tokenizer), no prefix space; the post-processor prepends ``<|bos|>`` (``add_bos_token``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ktcore.errors import KtError

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
#: Special tokens with their fixed ids 0, 1, 2.
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
#: llama.cpp's name of the pre-tokenizer regex used here (``tokenizer.ggml.pre``).
LLAMA_CPP_PRE = "gpt-2"

#: Standard-library modules whose sources are the training text, in training order.
CORPUS_MODULES = (
    "this", "colorsys", "bisect", "heapq", "sched", "quopri", "graphlib", "stringprep",
    "_markupbase", "textwrap", "string", "difflib", "html/entities", "json/decoder",
    "json/scanner", "getopt", "copyreg", "abc", "shlex", "fnmatch", "_compat_pickle", "numbers",
)

#: Bumped whenever training changes in a way that changes the result for the same text.
_FORMAT_VERSION = 1
_BYTE_TOKENS = 256


@dataclass(frozen=True)
class TokenizerSpec:
    """What a trained tokenizer depends on."""

    vocab_size: int
    model_max_length: int = 4096

    def __post_init__(self) -> None:
        smallest = len(SPECIAL_TOKENS) + _BYTE_TOKENS
        if self.vocab_size < smallest:
            raise KtError(f"vocab_size {self.vocab_size} is too small for a byte-level BPE "
                          f"tokenizer (needs at least {smallest}: 256 bytes + 3 special tokens)")
        if self.model_max_length < 1:
            raise KtError(f"model_max_length must be positive, got {self.model_max_length}")

    @classmethod
    def from_config(cls, config) -> "TokenizerSpec":
        return cls(int(config.vocab_size), int(getattr(config, "max_position_embeddings", 4096) or 4096))


def cache_dir() -> Path:
    """``$KTCORE_CACHE`` or ``~/.cache/ktcore``."""
    root = os.environ.get("KTCORE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "ktcore"


@lru_cache(maxsize=1)
def corpus_texts() -> tuple[str, ...]:
    """The training text: one string per module of ``CORPUS_MODULES`` found on this Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for module in CORPUS_MODULES:
        path = stdlib / f"{module}.py"
        try:
            # newline="" keeps the bytes as they are; utf-8 is the sources' declared encoding
            with open(path, encoding="utf-8", newline="") as f:
                texts.append(f.read())
        except OSError:
            log.warning("tokenizer corpus: %s is missing on this Python; the tokenizer will differ "
                        "from other machines'", path)
    if not texts:
        raise KtError(f"no training text: none of the corpus modules exists under {stdlib}")
    return tuple(texts)


def corpus_fingerprint() -> str:
    """SHA-256 (hex) of the training text."""
    digest = hashlib.sha256()
    for text in corpus_texts():
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def train_bpe(vocab_size: int):
    """Trains the raw ``tokenizers.Tokenizer`` of ``vocab_size`` ids (no cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    TokenizerSpec(vocab_size)  # validates the size
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus_texts(), trainer=trainer)
    learned = tokenizer.get_vocab_size()
    if learned < vocab_size:
        # the text has fewer merges to give: reserve the remaining ids, as real tokenizers do
        tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - learned)])
        log.debug("tokenizer: %d learned tokens, %d reserved", learned, vocab_size - learned)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    for token, expected in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID)):
        if tokenizer.token_to_id(token) != expected:  # the trainer's documented behaviour
            raise AssertionError(f"{token} got id {tokenizer.token_to_id(token)}, expected {expected}")
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"trained {tokenizer.get_vocab_size()} tokens, expected {vocab_size}")
    return tokenizer


def cached_bpe(vocab_size: int, cache: Path | None = None):
    """The raw tokenizer of ``vocab_size``, trained once per corpus and size and cached."""
    from tokenizers import Tokenizer

    cache = cache_dir() if cache is None else Path(cache)
    path = cache / "tokenizers" / f"bpe-v{_FORMAT_VERSION}-{vocab_size}-{corpus_fingerprint()[:16]}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # a damaged cache entry is retrained, not fatal
            log.warning("tokenizer cache %s is unreadable (%s); retraining", path, exc)
    tokenizer = train_bpe(vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokenizer.to_str())
        os.replace(tmp, path)  # atomic: concurrent trainers write identical files
    except OSError as exc:
        log.warning("cannot cache the tokenizer in %s: %s", path.parent, exc)
    return tokenizer


def build_tokenizer(spec_or_config, cache: Path | None = None):
    """A ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad set.

    Takes a ``TokenizerSpec`` or a transformers config (its ``vocab_size`` and
    ``max_position_embeddings``).
    """
    from transformers import PreTrainedTokenizerFast

    spec = spec_or_config if isinstance(spec_or_config, TokenizerSpec) else TokenizerSpec.from_config(spec_or_config)
    raw = cached_bpe(spec.vocab_size, cache)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=spec.model_max_length, clean_up_tokenization_spaces=False,
    )


def tokenizer_config(tokenizer) -> dict:
    """The ``tokenizer_config.json`` ktcore writes (readable by transformers 4 and 5 and gguf-py)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "ktcore_corpus_sha256": corpus_fingerprint(),
        "model_max_length": int(tokenizer.model_max_length),
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_tokenizer(tokenizer, outdir: str | Path) -> list[Path]:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The files are written directly (sorted keys, no library version inside) so the same
    tokenizer always gives the same bytes.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": tokenizer.backend_tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _dumps(tokenizer_config(tokenizer)),
        "special_tokens_map.json": _dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}),
    }
    paths = []
    for name, text in files.items():
        path = outdir / name
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _dumps(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
