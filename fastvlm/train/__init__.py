"""The paper recipes (docs/methods.md): losses, optimiser settings, schedules, and the one training loop
they share (``common.run_epochs``, docs/tuners.md)."""
