"""Offline distillation: toy data and model, the oracle, the distillers, evaluation."""
