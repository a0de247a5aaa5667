"""Optimisation loop, checkpoints (atomic, resumable) and metric sinks shared by the stages."""
