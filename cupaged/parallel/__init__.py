"""Tensor parallelism: comm.py (how ranks exchange activations), sharding.py (how a checkpoint is split over
them, and which sizes can be), tp_runner.py (the ranks of one model, stepped together by the engine's one
scheduler)."""
