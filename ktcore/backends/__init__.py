"""Backends: the plugin registry (``registry``), backend specs (``spec``) and ktcore's own
torch reference backends (``torch_backends``)."""
