"""One module per method (a config dataclass, its tuner layers, the patching into an open_clip model) and
``common.py``, the contract every tuner follows, the stacking rule, the registry and the one save/load
format (docs/tuners.md; the methods themselves: docs/methods.md)."""
