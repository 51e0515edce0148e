"""Training checkpoints: one directory = a tensor file + a versioned JSON manifest."""
