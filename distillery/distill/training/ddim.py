"""The deterministic DDIM update in alpha-bar terms, shared by the step distillers' teachers and targets, for a
UNet predicting eps or v (the base's scheduler config says which: SD 1.x eps, SD 2.x 768 v)."""

from __future__ import annotations

import torch

PREDICTIONS = ("epsilon", "v_prediction")  # "sample" (x0) prediction: no public base uses it


def require_supported_prediction(scheduler_config: dict, method: str) -> str:
    """The base's prediction type, or a ValueError naming the field and the types the distillers take."""
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"{method}: the base model predicts {kind!r} (scheduler_config.json prediction_type); "
                         f"the distillers take {list(PREDICTIONS)}")
    return kind


def noise_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for x0 noised with `noise` at `t` (the denoising loss's target)."""
    return noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean sample an eps prediction implies at noise level alpha_bar ((B,) or broadcastable)."""
    a = alpha_bar.reshape(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_and_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
               kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) a UNet output of prediction type `kind` implies at x_t. From v both are products (no division:
    defined at zero terminal SNR, alpha_bar = 0, where x0 from eps is not)."""
    if kind == "epsilon":
        return output, x0_from_eps(x_t, output, alpha_bar)
    a = alpha_bar.reshape(-1, 1, 1, 1).to(x_t.dtype)
    return a.sqrt() * output + (1 - a).sqrt() * x_t, a.sqrt() * x_t - (1 - a).sqrt() * output


def ddim_step(x_t: torch.Tensor, output: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor,
              kind: str = "epsilon") -> torch.Tensor:
    """One eta = 0 DDIM step from alpha-bar alpha_t to alpha_s with the UNet output (of prediction type `kind`)."""
    eps, x0 = eps_and_x0(output, x_t, alpha_t, kind)
    a_s = alpha_s.reshape(-1, 1, 1, 1).to(x_t.dtype)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
