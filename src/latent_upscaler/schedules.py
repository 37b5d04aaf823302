"""σ schedules: which noise levels a sampler visits, from σ_max down. All return float32 tensors.

``n`` is the number of steps in every schedule, so each returns ``n + 1`` values. The model's own
schedule ends at σ_min; the two from k-diffusion end with an extra step to σ = 0 (their last value).
"""

from __future__ import annotations

import math

import torch


def log_linear(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``n + 1`` values evenly spaced in log σ from σ_max to σ_min, with no trailing zero.

    The schedule the upscaler was released with (the notebook's, and diffusers'
    ``interpolation_type="log_linear"``).
    """
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1).exp()


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``n`` values evenly spaced in log σ from σ_max to σ_min, then 0 (k-diffusion's
    ``get_sigmas_exponential``)."""
    return _append_zero(log_linear(n - 1, sigma_min, sigma_max))


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``n`` values evenly spaced in σ^(1/ρ) from σ_max to σ_min, then 0.

    Karras et al. (2022), eq. 5: spacing in σ^(1/ρ) shortens the steps near σ_min, where the
    truncation error matters most; they found ρ = 7 best (k-diffusion's ``get_sigmas_karras``).
    """
    ramp = torch.linspace(0, 1, n)
    root_max, root_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((root_max + ramp * (root_min - root_max)) ** rho)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


SCHEDULES = {"log_linear": log_linear, "karras": karras, "exponential": exponential}
