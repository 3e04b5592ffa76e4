"""kt-amx: CPU routed experts (AMX, AVX-512, AVX2) for ktcore. See README.md."""

__version__ = "0.1.0"
