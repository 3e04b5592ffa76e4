"""Model families: configs (``presets``), the HF skeleton on the meta device (``skeleton``)."""
