"""The paper recipes: losses, optimiser settings, schedules and training loops."""
