"""Models, starting weights, checkpoints, the training loop and the training stages."""
