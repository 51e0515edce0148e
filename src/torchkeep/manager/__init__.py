"""CheckpointManager and its small, composable retention and save policies."""
