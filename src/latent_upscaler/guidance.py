"""Classifier-free guidance on the denoised estimate (Ho & Salimans 2022).

The x2 latent upscaler guides its x0 prediction, not an ε prediction:
denoised = uncond + scale · (cond − uncond).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ClassifierFreeGuidance(nn.Module):
    """Runs ``denoiser`` once on [x, x] with the unconditional half of ``cond`` first.

    ``cond``: keyword tensors whose batch is 2B, unconditional first (as the pipeline builds them).
    """

    def __init__(self, denoiser: nn.Module, scale: float):
        super().__init__()
        self.denoiser = denoiser
        self.scale = scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma_in = torch.cat([sigma, sigma]) if sigma.ndim else sigma
        denoised = self.denoiser(torch.cat([x, x]), sigma_in, **cond)
        uncond, cond_ = denoised.chunk(2)
        return uncond + self.scale * (cond_ - uncond)


def guidance_mode(guidance_scale: float, faithful: bool = False) -> str:
    """"uncond" (text ignored), "cond" (one conditional pass) or "cfg" (both, mixed by the scale).

    diffusers: 0 → uncond, (0, 1] → cond, above 1 → cfg. The original notebook (``faithful``):
    0 → uncond, exactly 1 → cond, any other value → cfg, so 0.5 interpolates between the two.
    """
    if guidance_scale == 0:
        return "uncond"
    if faithful:
        return "cond" if guidance_scale == 1 else "cfg"
    return "cfg" if guidance_scale > 1.0 else "cond"


