"""The distillation methods, one module each (guidance, consistency, progressive, pruning, style)."""
