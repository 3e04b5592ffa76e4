"""kt-amx: CPU routed experts and linear layers (AMX, AVX-512, AVX2) for ktcore. See README.md."""

__version__ = "0.1.0"


def shared_pool() -> tuple[int, int]:
    """``(address of the C function kt_pool_parallel_for, pool size)``; starts the pool if
    needed. See kt_amx/pool.py (imported lazily: importing kt_amx loads no extension)."""
    from kt_amx.pool import shared_pool as _shared_pool

    return _shared_pool()
