"""ktcore's default model: generated deterministically on first use and cached, so the
README's main command needs no download."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ARCH = "deepseek_v3"
DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0


def default_model_dir() -> Path:
    """The default model's HF directory, made (and cached) on the first call."""
    from ktcore.models.make_model import make_model
    from ktcore.models.tokenizer import cache_dir

    target = cache_dir() / "models" / f"{DEFAULT_PRESET}-{DEFAULT_ARCH}-seed{DEFAULT_SEED}"
    if (target / "config.json").is_file():
        return target
    log.warning("generating the default model into %s (first use only)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".making-", dir=target.parent))
    try:
        make_model(DEFAULT_ARCH, scratch, preset=DEFAULT_PRESET, seed=DEFAULT_SEED)
        try:
            scratch.rename(target)
        except OSError:  # another process made it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
