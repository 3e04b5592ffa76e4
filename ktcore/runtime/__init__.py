"""The model runtime: build a decoder from a config, weights and a placement plan
(``build``), run it with static caches (``decoder``), and the user-facing ``Model``."""
