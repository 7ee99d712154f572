"""How good a model is: oracle alignment and FID with the oracle's features."""
