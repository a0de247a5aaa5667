"""Rollout: batched generation from a role of the shared backbone."""
