"""ktcore's own pure-torch reference backends, registered through the entry point like any
plugin's (``torch = ktcore.backends.torch_backends:register`` in pyproject.toml)."""

from __future__ import annotations

from ktcore.backends.spec import BackendSpec, OptionSpec

DTYPE_OPTION = OptionSpec("dtype", str, ("bf16", "fp16", "fp32"), None,
                    "compute/storage dtype; default: the weight's dtype (fp32 for GGUF)")

MAX_POSITIONS_OPTION = OptionSpec("max_positions", int, None, None,
                            "length of the RoPE table (default: the model's maximum; the runtime passes its cache length)")

_FACTORIES = {
    "linear": "ktcore.ops.linear:TorchLinear",
    "experts": "ktcore.ops.experts:TorchExperts",
    "mla": "ktcore.ops.mla:TorchMLA",
    "rope": "ktcore.ops.rope:TorchRope",
}


def register(registry) -> None:
    for op, factory in _FACTORIES.items():
        registry.add(BackendSpec(
            name="torch",
            op=op,
            devices=("cpu", "cuda"),
            factory=factory,
            formats=("dense", "gguf:*"),
            options={"linear": (DTYPE_OPTION,), "experts": (DTYPE_OPTION,), "mla": (DTYPE_OPTION, MAX_POSITIONS_OPTION),
                     "rope": (MAX_POSITIONS_OPTION,)}[op],
            description=f"pure-torch reference {op} (the correctness oracle; GGUF is dequantised at load)",
        ))
