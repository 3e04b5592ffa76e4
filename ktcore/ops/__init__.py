"""Operator interfaces and their pure-torch reference implementations.

Each operator lives in its own module: ``linear``, ``experts``, ``mla``, ``rope``. Core
modules without a plugin interface: ``rmsnorm``, ``router``, ``gqa``. Nothing is imported
here so that ``import ktcore.ops`` stays cheap; import the module you need.
"""

#: Operator names a rule's ``replace.op`` may use, in the order the docs list them.
OPERATORS = ("linear", "experts", "mla", "rope")
