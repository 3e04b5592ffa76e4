"""The rule files shipped with ktcore (``rules/<arch>-<placement>.yaml``).

Installed, they are the package data of ``ktcore.rule_files`` (pyproject maps the repo's
``rules/`` directory to that package); in a source checkout they are read from ``rules/``
beside the ``ktcore`` package. The CLI accepts a shipped file's stem (``qwen3_moe-cpu``)
wherever a rule file path is expected and no such path exists.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from ktcore.backends.registry import closest
from ktcore.errors import KtError

PACKAGE = "ktcore.rule_files"
SUFFIX = ".yaml"


def shipped_dir() -> Path | None:
    """The directory holding the shipped rule files, or None when there is none."""
    try:
        root = importlib.resources.files(PACKAGE)
    except (ModuleNotFoundError, TypeError):
        root = None
    if root is not None:
        for candidate in _paths_of(root):
            if candidate.is_dir() and any(candidate.glob("*" + SUFFIX)):
                return candidate
    checkout = Path(__file__).resolve().parents[2] / "rules"
    return checkout if checkout.is_dir() else None


def _paths_of(root) -> list[Path]:
    if isinstance(root, Path):
        return [root]
    # a namespace package's MultiplexedPath: one directory per portion
    return [p for p in getattr(root, "_paths", []) if isinstance(p, Path)]


def shipped_rule_files() -> dict[str, Path]:
    """Stem -> path of every shipped rule file, sorted by stem."""
    directory = shipped_dir()
    if directory is None:
        return {}
    return {p.stem: p for p in sorted(directory.glob("*" + SUFFIX))}


def describe(path: Path) -> str:
    """The first line of a rule file's comment header (without ``#``)."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("#"):
                    text = line.lstrip("#").strip()
                    if text.startswith(path.stem + ":"):  # "# qwen3_moe-cpu: what it does"
                        text = text[len(path.stem) + 1:].strip()
                    if text:
                        return text
                elif line:
                    break
    except OSError:
        pass
    return ""


def resolve_rule_path(text: str) -> Path:
    """A path that exists, else the shipped file of that stem; ``KtError`` with close names."""
    path = Path(text)
    if path.exists():
        return path
    shipped = shipped_rule_files()
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    hint = closest(stem, shipped)
    raise KtError(f"{text}: no such rule file, nor a shipped one{hint} (see 'kt rules list')")
