"""Training: engine, metrics, checkpoints and the tracker the engine reports to."""
