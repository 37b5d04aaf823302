"""Karras preconditioning: the one place where σ turns into c_skip, c_out, c_in and c_noise.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1,
with the x2 latent upscaler's σ_data = 1 and its c_noise = ln(σ) / 4.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class KarrasDenoiser(nn.Module):
    """Wraps a network F into a denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise).

    ``inner_model(x_scaled, c_noise, **cond)`` takes the scaled noisy latent and returns F.
    ``x``: noisy latents, NCHW, scaled by the VAE's scaling_factor; ``sigma``: a 0-d tensor or (B,).
    Returns the denoised latent (the model's estimate of x0) in the dtype of ``x``.
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1.0):
        super().__init__()
        self.inner_model = inner_model
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in) of Karras et al. (2022), Table 1."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2) ** 0.5
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / norm
        c_in = 1 / norm
        return c_skip, c_out, c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        c_noise = torch.log(sigma) * 0.25
        if sigma.ndim:  # one σ per batch element
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, _ = self.scalings(sigma)
        # x / norm rather than x * c_in: the division is what diffusers computes, bit for bit
        x_scaled = x / (sigma**2 + self.sigma_data**2) ** 0.5
        model_output = self.inner_model(x_scaled, c_noise, **cond)
        return c_skip * x + c_out * model_output
