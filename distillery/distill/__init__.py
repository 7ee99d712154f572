"""Offline distillation, by role: toy/ (the toy world), training/ (the shared loop), methods/ (one module
per method), evaluation/ (alignment, FID)."""
