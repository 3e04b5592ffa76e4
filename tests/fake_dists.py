"""Installs throw-away distributions with ``ktcore.backends`` entry points on ``sys.path``,
so registry tests exercise the real ``importlib.metadata`` discovery."""

from __future__ import annotations

import sys
from pathlib import Path


def make_dist(root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Writes ``<dist>-<version>.dist-info`` (METADATA, entry_points.txt) and module files."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[ktcore.backends]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


def only_fake_entry_points(root: Path):
    """The ``ktcore.backends`` entry points found under ``root`` alone."""
    from importlib.metadata import distributions

    eps = []
    for d in distributions(path=[str(root)]):
        eps.extend(ep for ep in d.entry_points if ep.group == "ktcore.backends")
    return eps


class on_sys_path:
    """Context manager putting ``root`` first on sys.path and forgetting its modules after."""

    def __init__(self, root: Path):
        self.root = str(root)

    def __enter__(self):
        sys.path.insert(0, self.root)
        self.before = set(sys.modules)
        return self

    def __exit__(self, *exc):
        sys.path.remove(self.root)
        for name in set(sys.modules) - self.before:
            module = sys.modules.get(name)
            if getattr(module, "__file__", "") and str(module.__file__).startswith(self.root):
                del sys.modules[name]
