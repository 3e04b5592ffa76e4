"""An example third-party ktcore backend plugin (backend ``example``, operator ``experts``)."""

__version__ = "0.3.1"
