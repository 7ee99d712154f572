"""What every distiller shares: the training loop, checkpoints, data loading, students, the DDIM update."""
