"""Tiny CPU-sized task and helpers for end-to-end runs of the pipeline."""
