"""How the x2 latent upscaler's UNet is conditioned, in one thin module around it.

The UNet sees 8 channels: the scaled noisy latent (4) followed by the low-resolution latent,
nearest-upsampled ×2 (4). Its timestep input is c_noise; ``timestep_cond`` carries the Fourier
embedding of the low-res noise level and the pooled CLIP embedding; cross-attention reads the CLIP
token states. Its 5th output channel is the original model's log-variance, which sampling ignores.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: Fourier features of the low-res noise level 0: cos(0) for the 64 cosines, sin(0) for the 64 sines
_NOISE_LEVEL_FEATURES = 64


def upsample_low_res(low_res_latents: torch.Tensor) -> torch.Tensor:
    """Nearest ×2 upsampling of the low-res latents to the UNet's resolution (NCHW)."""
    return F.interpolate(low_res_latents, scale_factor=2, mode="nearest")


def zero_noise_level_embedding(batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The embedding of low-res noise level 0, (batch, 128): ``[1]*64 + [0]*64``."""
    ones = torch.ones(batch, _NOISE_LEVEL_FEATURES, dtype=dtype, device=device)
    return torch.cat([ones, torch.zeros_like(ones)], dim=1)


class UpscalerConditioning(nn.Module):
    """F(x_scaled, c_noise; low_res_cond, encoder_hidden_states, timestep_cond) → 4 channels.

    ``low_res_cond``: the nearest-upsampled low-res latents, same size as ``x_scaled``.
    ``encoder_hidden_states``: CLIP token states (B, 77, 768); ``timestep_cond``: (B, 896).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x_scaled: torch.Tensor,
        c_noise: torch.Tensor,
        *,
        low_res_cond: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        unet_input = torch.cat([x_scaled.to(low_res_cond.dtype), low_res_cond], dim=1)
        out = self.unet(
            unet_input,
            c_noise,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            encoder_attention_mask=encoder_attention_mask,
        )
        return out[:, :-1]  # drop the log-variance channel
