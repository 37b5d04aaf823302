"""Samplers as stateless functions over a σ list, with k-diffusion's signatures.

``model(x, sigma, **extra_args)`` returns the denoised estimate (``sigma`` a 0-d tensor, or one σ
per batch element); ``sigmas`` runs from σ_max down; a run visits every σ in the list and returns x
at the last one. ``callback`` sees each step before its update, as in k-diffusion.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from tqdm.auto import trange


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Dict[str, Any]] = None,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    disable: Optional[bool] = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    extra_args = {} if extra_args is None else extra_args
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        d = to_d(x, sigma, denoised)
        x = x + d * (sigmas[i + 1] - sigma)
    return x
