"""Skips tests marked ``cuda`` or ``amx`` on hosts without a CUDA GPU or AMX tiles, saying why."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    from ktcore.backends.host import cpu_flags

    no_cuda = None if torch.cuda.is_available() else "needs a CUDA GPU: run on the GPU host (-m cuda)"
    no_amx = None if {"amx_tile", "amx_bf16"} <= cpu_flags() else "needs a CPU with AMX tiles: run on the GPU host (-m amx)"
    for item in items:
        for marker, reason in (("cuda", no_cuda), ("amx", no_amx)):
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
