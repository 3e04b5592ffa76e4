"""The ``kt`` command line."""
