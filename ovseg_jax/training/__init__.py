"""Training: the generic `Trainer` loop, the per-stage tasks (`tasks/`), optimisers from regex
tables, sharding over meshes, checkpoints (orbax) and monitoring (clu)."""
