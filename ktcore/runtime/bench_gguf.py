"""The GGUF files of ``kt bench``'s GGUF cases: written once, named by what fixes them, reused.

A case with ``source="gguf:q4_k_m"`` runs its model from a GGUF of random valid blocks in
llama.cpp's Q4_K_M type mix (``formats.q4_k_m``, ``formats.random_gguf``), written into
``gguf_dir`` (default ``$KTCORE_CACHE/bench``, i.e. ``~/.cache/ktcore/bench``) as
``<preset>-<layers>L-Q4_K_M-seed<seed>-<key>.gguf``. ``key`` hashes everything the bytes
depend on (config, type plan, seed, generator version, tokenizer corpus), so a file of that
name is reused as it is and any change writes a new one. Files are written under a temporary
name and renamed when complete, so an interrupted write never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktcore.errors import KtError

log = logging.getLogger(__name__)

#: ``BenchCase.source`` values that run from a GGUF, and the file-type label of each.
GGUF_SOURCES = {"gguf:q4_k_m": "Q4_K_M"}


@dataclass(frozen=True)
class BenchGGUF:
    """A bench GGUF on disk: where, how big, and how long writing it took (None: reused)."""

    path: Path
    nbytes: int
    write_s: float | None


def default_gguf_dir() -> Path:
    """``$KTCORE_CACHE/bench`` (``~/.cache/ktcore/bench``)."""
    from ktcore.models.tokenizer import cache_dir

    return cache_dir() / "bench"


def gguf_types(config: Any, source: str) -> dict[str, str]:
    """The GGUF type of every tensor for ``source``."""
    if source not in GGUF_SOURCES:
        raise KtError(f"unknown GGUF source {source!r}; one of {', '.join(GGUF_SOURCES)}")
    from ktcore.formats.q4_k_m import q4_k_m_types

    return q4_k_m_types(config)


def file_name(config: Any, stem: str, source: str, seed: int, types: dict[str, str]) -> str:
    """``<stem>-<layers>L-<label>-seed<seed>-<key>.gguf`` (see the module docstring); ``types``
    is ``gguf_types(config, source)``."""
    from ktcore.formats.random_gguf import VERSION
    from ktcore.models.tokenizer import corpus_fingerprint

    settings = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    text = json.dumps({"config": settings, "types": types, "seed": seed, "generator": VERSION,
                       "tokenizer": corpus_fingerprint()}, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{stem}-{config.num_hidden_layers}L-{GGUF_SOURCES[source]}-seed{seed}-{key}.gguf"


def bench_gguf(config: Any, stem: str, source: str, seed: int = 0, gguf_dir: str | Path | None = None,
               threads: int | None = None) -> BenchGGUF:
    """The bench GGUF of ``config`` for ``source``: the cached file, or written now."""
    from ktcore.formats.gguf_names import gguf_plan
    from ktcore.ops.weights import gguf_nbytes

    directory = Path(gguf_dir) if gguf_dir is not None else default_gguf_dir()
    types = gguf_types(config, source)
    path = directory / file_name(config, stem, source, seed, types)
    if path.is_file():
        log.info("bench GGUF: reusing %s", path)
        return BenchGGUF(path, path.stat().st_size, None)
    need = sum(gguf_nbytes(types[s.name], s.shape, s.name) for s in gguf_plan(config))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KtError(f"{directory}: cannot create the bench GGUF directory: {exc} "
                      f"(choose another: --gguf-dir)") from None
    free = shutil.disk_usage(directory).free
    if free < need * 1.05:
        raise KtError(f"{directory}: {need / 1e9:.1f} GB needed for {path.name}, {free / 1e9:.1f} GB free "
                      f"(choose another directory: --gguf-dir)")
    log.warning("bench GGUF: writing %s (%.2f GB, first use only)", path, need / 1e9)
    tmp = directory / f".{path.stem}.{os.getpid()}.tmp.gguf"
    t0 = time.perf_counter()
    try:
        _write(tmp, config, types, seed, threads, stem)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_s = time.perf_counter() - t0
    log.info("bench GGUF: wrote %s in %.1f s", path, write_s)
    return BenchGGUF(path, path.stat().st_size, write_s)


def _write(path: Path, config: Any, types: dict[str, str], seed: int, threads: int | None, name: str) -> None:
    from ktcore.formats.random_gguf import write_random_gguf
    from ktcore.models.tokenizer import build_tokenizer

    write_random_gguf(path, config, build_tokenizer(config), types, seed=seed, file_qtype="Q4_K", threads=threads,
                      name=name)
