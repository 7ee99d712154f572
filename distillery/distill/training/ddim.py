"""The deterministic DDIM update in alpha-bar terms, shared by the step distillers' teachers and targets."""

from __future__ import annotations

import torch


def require_eps_prediction(scheduler_config: dict, method: str) -> None:
    """The step and style distillers' targets are written for eps prediction: a v-prediction base (SD 2.x 768)
    would train on wrong targets, silently. Guidance distillation and pruning match outputs in any parametrisation."""
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise ValueError(f"{method}: the base model predicts {kind!r} (scheduler_config.json prediction_type); "
                         f"this distiller supports 'epsilon' bases only")


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean sample an eps prediction implies at noise level alpha_bar ((B,) or broadcastable)."""
    a = alpha_bar.reshape(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
    """One eta = 0 DDIM step from alpha-bar alpha_t to alpha_s with the prediction eps."""
    a_s = alpha_s.reshape(-1, 1, 1, 1).to(x_t.dtype)
    return a_s.sqrt() * x0_from_eps(x_t, eps, alpha_t) + (1 - a_s).sqrt() * eps
