"""The frozen base model, the adapter bank of roles on it, scalar heads and forward helpers."""
