"""What a plugin registers: one ``BackendSpec`` per (backend name, operator)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ktcore.ops import OPERATORS

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class OptionSpec:
    """One option a backend accepts under ``replace.options`` in a rule file."""

    name: str
    type: type = str
    choices: tuple[Any, ...] | None = None
    default: Any = None
    help: str = ""

    def check(self, value: Any) -> str | None:
        """Returns why ``value`` is not acceptable, or None."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            return f"option {self.name!r} must be of type {self.type.__name__}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            return f"option {self.name!r} must be one of {allowed}, got {value!r}"
        return None


@dataclass(frozen=True)
class BackendSpec:
    """A backend of one operator.

    ``factory`` is ``"module:attr"`` and is imported only when an instance is built, so that
    listing backends never imports kernels. ``probe`` is a cheap callable returning None when
    the backend can run on this host, else a human-readable reason ("no CUDA device", ...).
    ``formats`` are the weight sources it accepts: ``"dense"``, ``"gguf:<TYPE>"`` or
    ``"gguf:*"``. ``distribution``/``version`` are filled in by the registry.
    """

    name: str
    op: str
    devices: tuple[str, ...]
    factory: str
    formats: tuple[str, ...] = ("dense",)
    options: tuple[OptionSpec, ...] = ()
    probe: Callable[[], str | None] | None = None
    description: str = ""
    distribution: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"backend name {self.name!r} must match {_NAME.pattern}")
        if self.op not in OPERATORS:
            raise ValueError(f"backend {self.name!r}: unknown operator {self.op!r} (one of {', '.join(OPERATORS)})")
        bad = [d for d in self.devices if d not in DEVICE_TYPES]
        if not self.devices or bad:
            raise ValueError(f"backend {self.name!r}: devices must be a non-empty subset of {DEVICE_TYPES}, got {self.devices}")
        if ":" not in self.factory:
            raise ValueError(f"backend {self.name!r}: factory must be 'module:attr', got {self.factory!r}")
        names = [o.name for o in self.options]
        if len(names) != len(set(names)):
            raise ValueError(f"backend {self.name!r}: duplicate option names {names}")

    def run_probe(self) -> str | None:
        """Runs the probe; None means available. A probe that raises counts as unavailable."""
        try:
            return self.probe() if self.probe else None
        except Exception as exc:  # a probe must never take the host down
            return f"probe failed: {type(exc).__name__}: {exc}"

    def accepts(self, weight_format: str) -> bool:
        if weight_format in self.formats:
            return True
        return weight_format.startswith("gguf:") and "gguf:*" in self.formats

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if o.name == name), None)

    def load_factory(self) -> Callable[..., Any]:
        module_name, _, attr = self.factory.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)

    def build(self, spec: Any, device: str, options: dict | None = None) -> Any:
        """Instantiates the operator: ``factory(spec, device, options)``."""
        return self.load_factory()(spec, device, dict(options or {}))
