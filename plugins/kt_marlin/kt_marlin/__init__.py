"""kt-marlin: Triton GPU kernels for ktcore. See README.md."""

__version__ = "0.1.0"
