"""Runtime memory: the KV cache as a managed memory."""
