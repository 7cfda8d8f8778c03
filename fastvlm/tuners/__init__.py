"""One module per method (a config dataclass, its tuner layers, the patching into a model), ``common.py``,
the contract every tuner follows, the stacking rule, the registry and the one save/load format, and
``targets.py``, which modules a tuner patches (``target_modules`` and the per-architecture presets)
(docs/tuners.md; the methods themselves: docs/methods.md)."""
