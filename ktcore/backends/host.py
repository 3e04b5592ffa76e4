"""Cheap host facts for backend probes: CPU instruction sets (from /proc/cpuinfo, never by
executing an instruction) and CUDA visibility."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty off Linux or off x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cuda_unavailable_reason(min_capability: tuple[int, int] | None = None) -> str | None:
    """None when a CUDA device is visible (and new enough), else why not."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda
        return "no CUDA device visible" + ("" if built else " (this torch build has no CUDA)")
    if min_capability is not None:
        cap = torch.cuda.get_device_capability(0)
        if cap < min_capability:
            return f"CUDA capability {cap[0]}.{cap[1]} < required {min_capability[0]}.{min_capability[1]}"
    return None


def missing_module_reason(module: str, distribution: str) -> str | None:
    """None when ``module`` (e.g. a compiled extension) can be found, else why not."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"compiled extension {module} is not built (reinstall {distribution})"


def load_extension(module: str, path_variable: str):
    """Imports a plugin's compiled extension ``module``, or, when the environment variable
    ``path_variable`` names a file, that build of it instead (sanitizer or ISA-test builds)."""
    import importlib
    import importlib.util
    import os

    path = os.environ.get(path_variable)
    if not path:
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path_variable}={path!r} is not a loadable extension")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded
