"""kt-llamafile: CPU matmul on GGUF blocks for ktcore. See README.md."""

__version__ = "0.1.0"
