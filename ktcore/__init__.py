"""ktcore: run Mixture-of-Experts LLMs larger than GPU memory.

The core defines the operators (``ktcore.ops``), the backend registry filled from the
``ktcore.backends`` entry-point group (``ktcore.backends``) and the YAML placement rules
(``ktcore.rules``). Kernels live in separately installed plugins. Importing this package has
no side effects and imports nothing heavy.
"""

__version__ = "0.1.0"
