"""Learned memory state inside the model: memory tokens, segment recurrence, compression, ..."""
