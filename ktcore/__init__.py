"""ktcore: run Mixture-of-Experts LLMs larger than GPU memory.

The core defines the operators (``ktcore.ops``), the backend registry filled from the
``ktcore.backends`` entry-point group (``ktcore.backends``) and the YAML placement rules
(``ktcore.rules``). Kernels live in separately installed plugins. Importing this package has
no side effects and imports nothing heavy.
"""

__version__ = "0.1.0"


def __getattr__(name):
    """``ktcore.load`` without importing torch at ``import ktcore``."""
    if name == "load":
        from ktcore.runtime.model import load

        return load
    raise AttributeError(f"module 'ktcore' has no attribute {name!r}")
