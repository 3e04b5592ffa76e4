"""kt-llamafile's tests run on its own worker pool (KT_LLAMAFILE_POOL=own), so that the thread
counts they ask for are the ones that run, whether or not kt-amx (whose shared pool would be
chosen otherwise) is installed; tests of the shared pool select it themselves (``pool_mode``)."""

from __future__ import annotations

import os

import pytest


def select_pool_mode(mode: str | None) -> None:
    """Sets KT_LLAMAFILE_POOL (None: unset) and forgets the pool chosen so far."""
    from kt_llamafile import pools

    if mode is None:
        os.environ.pop(pools.POOL_ENV, None)
    else:
        os.environ[pools.POOL_ENV] = mode
    pools.shared_pool.cache_clear()


@pytest.fixture(autouse=True, scope="module")
def own_pool_by_default():
    before = os.environ.get("KT_LLAMAFILE_POOL")
    select_pool_mode("own")
    yield
    select_pool_mode(before)


@pytest.fixture
def pool_mode():
    """``pool_mode("shared" | "own" | "auto")`` for one test; the module's mode comes back after."""
    before = os.environ.get("KT_LLAMAFILE_POOL")
    yield select_pool_mode
    select_pool_mode(before)
