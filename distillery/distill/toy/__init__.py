"""The toy world: its data, its model architecture and training, the oracle that judges its images."""
