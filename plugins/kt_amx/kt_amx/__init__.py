"""kt-amx: CPU routed experts and linear layers (AMX, AVX-512, AVX2) for ktcore. See README.md."""

__version__ = "0.1.0"


def shared_pool() -> tuple[int, int]:
    """``(address of the C function kt_pool_parallel_for, pool size)``; starts the pool if
    needed. See kt_amx/pool.py (imported lazily: importing kt_amx loads no extension)."""
    from kt_amx.pool import shared_pool as _shared_pool

    return _shared_pool()


def spin_for_graphs() -> None:
    """Tells the shared pool that its work now runs from CUDA graphs: idle workers spin longer
    before they sleep (``KT_AMX_GRAPH_SPIN_US``), so each layer's job does not pay for waking
    them. For other plugins whose graph jobs run on the shared pool (kt-amx's own jobs do it)."""
    from kt_amx._lib import spin_for_graphs as _spin_for_graphs

    _spin_for_graphs()
