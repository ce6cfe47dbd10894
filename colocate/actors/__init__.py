"""The actors on the GPUs: the vLLM engine, the trainer rank and its backends, weight export and
partitioned load; the engine's sleep strategies in ``sleep``, and what only this CPU build needs
in ``cpu``."""
