"""One module per method: a config dataclass, the module(s), the patching into an open_clip model, export."""
