"""Fixtures for the rule tests: a registry with the torch backends and some fakes, the tiny
models of every family (each skeleton built once per session), a rule-file writer and a CLI
runner that injects the registry."""

from __future__ import annotations

import importlib.util
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from ktcore.backends import torch_backends
from ktcore.backends.registry import Registry
from ktcore.backends.spec import BackendSpec, OptionSpec
from ktcore.models.presets import ARCHITECTURES, make_config, write_config
from ktcore.rules import ModelInventory


def make_registry() -> Registry:
    """torch (all ops, cpu+cuda) plus:

    - ``gpuonly``: experts/linear, cuda only, probe "no CUDA device";
    - ``slowcpu``: experts, cpu only, probe "no AVX-512 on this CPU";
    - ``quant``: experts/linear on cpu+cuda with options format/group_size/threads;
    - ``broken``: a plugin whose module does not import.
    """
    registry = Registry()
    torch_backends.register(registry)
    for op in ("experts", "linear"):
        registry.add(BackendSpec("gpuonly", op, ("cuda",), "fake:Fake", probe=lambda: "no CUDA device"))
    registry.add(BackendSpec("slowcpu", "experts", ("cpu",), "fake:Fake", probe=lambda: "no AVX-512 on this CPU"))
    options = (
        OptionSpec("format", str, ("int8", "int4")),
        OptionSpec("group_size", int, None, 128),
        OptionSpec("threads", int),
    )
    for op in ("experts", "linear"):
        registry.add(BackendSpec("quant", op, ("cpu", "cuda"), "fake:Fake", options=options))
    registry.load_entry_point(EntryPoint("broken", "no_such_module_xyz:register", "ktcore.backends"))
    return registry


@pytest.fixture
def registry() -> Registry:
    return make_registry()


_MODELS: dict[str, ModelInventory] = {}


def tiny_model(arch: str) -> ModelInventory:
    """The tiny preset's skeleton inventory, built once per test session."""
    if arch not in _MODELS:
        _MODELS[arch] = ModelInventory.from_config(make_config(arch), f"tiny {arch}")
    return _MODELS[arch]


@pytest.fixture(scope="session")
def models() -> dict[str, ModelInventory]:
    return {arch: tiny_model(arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A config.json directory of each family's tiny preset (for --model)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: write_config(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture
def write_rules(tmp_path):
    """``write_rules(text, name="rules.yaml") -> path``; the text is dedented."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def cli(monkeypatch, registry):
    """``cli(*argv) -> exit code`` through ``ktcore.cli.main.main`` with the fake registry.

    Sub-command modules that do not exist (yet) are left out of the parser.
    """
    from ktcore.cli import main as cli_main
    from ktcore.cli import rules_cmd

    present = tuple(m for m in cli_main.COMMAND_MODULES if importlib.util.find_spec(m) is not None)
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", present)
    monkeypatch.setattr(rules_cmd, "load_registry", lambda: registry)

    def run(*argv: str) -> int:
        return cli_main.main([str(a) for a in argv])

    return run
