"""Pipeline stages; each exposes `run(cfg, force=False) -> Path` (the stage's output folder)."""
