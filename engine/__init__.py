"""ember.engine: data, training loop, checkpoints, distributed, losses, metrics and the CLI."""
