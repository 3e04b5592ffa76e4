"""Tells ktcore what this distribution provides. Imported when ktcore lists backends, so it
stays cheap: the kernel module (``dense_experts``) is only imported when a rule uses it."""

from __future__ import annotations

from ktcore.backends.spec import BackendSpec, OptionSpec


def probe() -> str | None:
    """Runs anywhere torch runs; a real plugin checks its ISA, GPU or library here."""
    return None


def register(registry) -> None:
    registry.add(BackendSpec(
        name="example",
        op="experts",
        devices=("cpu", "cuda"),
        factory="kt_example_plugin.dense_experts:DenseExperts",
        formats=("dense", "gguf:*"),
        options=(OptionSpec("dtype", str, ("fp32", "bf16"), "fp32", "compute dtype"),),
        probe=probe,
        description="example plugin: every owned expert on every token, masked (static shapes)",
    ))
