"""Weight files: safetensors (HF directories) and GGUF, both seen through ``WeightStore``."""
