"""The backend registry, filled from the ``ktcore.backends`` entry-point group.

Each entry point names a function ``register(registry)`` that calls ``registry.add(spec)``
for every backend its distribution provides. The entry point's name is the backend name it
provides (a distribution may register the same name for several operators). A distribution
whose entry point fails to import or raises is skipped with a warning naming it; a rule that
asks for one of its backends later gets an error quoting that failure.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from ktcore.backends.spec import BackendSpec
from ktcore.errors import BackendError

log = logging.getLogger(__name__)

GROUP = "ktcore.backends"


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that could not be loaded or whose register function raised."""

    entry_point: str
    distribution: str
    version: str
    error: str  # "ExceptionType: message"
    detail: str  # the formatted traceback, for --verbose


class Registry:
    """Backends by (name, operator), plus the plugins that failed to load."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], BackendSpec] = {}
        self._owner: dict[str, str] = {}  # backend name -> distribution
        self._probes: dict[tuple[str, str], str | None] = {}
        self.failures: dict[str, PluginFailure] = {}
        self._registering: tuple[str, str] = ("<direct>", "")

    # -- filling -------------------------------------------------------------------------
    def add(self, spec: BackendSpec) -> None:
        """Called by plugins' register functions. Fills in distribution and version."""
        dist, version = self._registering
        if not spec.distribution:
            spec = dataclasses.replace(spec, distribution=dist, version=version)
        owner = self._owner.get(spec.name)
        if owner is not None and owner != spec.distribution:
            raise BackendError(
                f"backend name {spec.name!r} is registered by two distributions: "
                f"{owner} and {spec.distribution}; uninstall one of them"
            )
        if (spec.name, spec.op) in self._specs:
            raise BackendError(f"{spec.distribution} registers backend {spec.name!r} for {spec.op!r} twice")
        self._owner[spec.name] = spec.distribution
        self._specs[(spec.name, spec.op)] = spec

    def load_entry_point(self, ep: EntryPoint) -> None:
        """Imports one entry point and runs its register function; records failures."""
        dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
        version = ep.dist.version if ep.dist is not None else ""
        self._registering = (dist, version)
        try:
            register = ep.load()
            register(self)
        except BackendError:
            raise
        except Exception as exc:
            failure = PluginFailure(ep.name, dist, version, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            self.failures[ep.name] = failure
            log.warning("skipping backend plugin %r of distribution %s: %s", ep.name, dist, failure.error)
        finally:
            self._registering = ("<direct>", "")

    @classmethod
    def from_entry_points(cls, eps: Iterable[EntryPoint] | None = None) -> "Registry":
        registry = cls()
        if eps is None:
            eps = entry_points(group=GROUP)
        seen: set[tuple[str, str]] = set()
        for ep in sorted(eps, key=lambda e: (e.name != "torch", e.name, e.value)):
            key = (ep.name, ep.value)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            registry.load_entry_point(ep)
        return registry

    # -- queries -------------------------------------------------------------------------
    def specs(self) -> list[BackendSpec]:
        return sorted(self._specs.values(), key=lambda s: (s.name, s.op))

    def names(self) -> list[str]:
        return sorted(set(self._owner) | set(self.failures))

    def ops_of(self, name: str) -> list[str]:
        return sorted(op for (n, op) in self._specs if n == name)

    def get(self, name: str, op: str) -> BackendSpec:
        """The spec of backend ``name`` for operator ``op``; a ``BackendError`` that says why not."""
        spec = self._specs.get((name, op))
        if spec is not None:
            return spec
        if name in self.failures:
            f = self.failures[name]
            raise BackendError(
                f"backend {name!r} could not be loaded: distribution {f.distribution} failed to import: {f.error}"
            )
        if name in self._owner:
            raise BackendError(
                f"backend {name!r} ({self._owner[name]}) has no {op!r} operator; "
                f"it provides: {', '.join(self.ops_of(name))}"
            )
        with_op = sorted({n for (n, o) in self._specs if o == op})
        hint = closest(name, self.names())
        raise BackendError(
            f"unknown backend {name!r}{hint}; backends for {op!r}: {', '.join(with_op) or 'none'}"
        )

    def unavailable_reason(self, spec: BackendSpec) -> str | None:
        """The probe's reason (cached per registry); None when the backend can run here."""
        key = (spec.name, spec.op)
        if key not in self._probes:
            self._probes[key] = spec.run_probe()
        return self._probes[key]


def closest(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the nearest candidates, or ``""``."""
    matches = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"
