"""How the x2 latent upscaler's UNet is conditioned, in one thin module around it.

The UNet sees 8 channels: the scaled noisy latent (4) followed by the low-resolution latent,
nearest-upsampled ×2 and scaled by c_in of its own noise level (4). Its time embedding gets c_noise
plus ``timestep_cond``: the Fourier embedding of log1p(low-res noise level) (128) and the pooled CLIP
embedding. Cross-attention reads the CLIP token states. Its 5th output channel is the original
model's log-variance, which sampling ignores. This is the original ``NoiseLevelAndTextConditionedUpscaler``
wrapper (reference original-and-users.md §1.4), with the per-call work done once per upscale.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .models.ops import packed_convolutions, return_freed_memory
from .randomness import Generators, randn

#: latents of at most this many pixels (48 × 48: 384 px outputs) run the UNet's convolutions with
#: weights packed once per upscale (:func:`~latent_upscaler.models.ops.packed_convolutions`): there
#: the per-call reorder costs as much as the convolution (12 % of a step at 32 × 32); at 64 × 64 and
#: above it is lost in the arithmetic, and the packed copies would only add memory (0.7 GiB)
PACK_MAX_AREA = 48 * 48

#: Fourier frequencies of the low-res noise-level embedding (the original's FourierFeatures(1, 128))
NOISE_LEVEL_FREQUENCIES = 64
NOISE_AUG_TYPES = ("gaussian", "fake")


class MissingNoiseEmbeddingError(ValueError):
    """noise_level > 0 without the original checkpoint's noise-level embedding."""


def noise_level_embedding(noise_level: torch.Tensor, weight: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The original's Fourier features of ``log1p(noise_level)``: ``[cos 2πfW, sin 2πfW]``, (B, 128).

    ``noise_level``: (B,) σ of the low-res augmentation. ``weight``: the (64, 1) random frequencies
    of the original checkpoint (``low_res_noise_embed.weight``), which diffusers' conversion drops;
    without them only level 0 can be embedded (cos 0 = 1, sin 0 = 0, whatever the frequencies).
    """
    if weight is None:
        if bool((noise_level != 0).any()):
            raise MissingNoiseEmbeddingError(
                "noise_level > 0 needs the noise-level embedding of the original k-diffusion checkpoint "
                "(low_res_noise_embed.weight), which diffusers-format folders such as "
                "stabilityai/sd-x2-latent-upscaler do not carry. Load the original checkpoint with "
                "StableDiffusionLatentUpscalePipeline.from_single_file(...) (or convert it with "
                "`latent-upscale convert`), or use noise_level=0"
            )
        ones = torch.ones(noise_level.shape[0], NOISE_LEVEL_FREQUENCIES, dtype=dtype, device=noise_level.device)
        return torch.cat([ones, torch.zeros_like(ones)], dim=1)
    angles = 2 * math.pi * noise_level.log1p()[:, None] @ weight.to(noise_level.device, torch.float32).T
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(dtype)


def augment_low_res(low_res: torch.Tensor, noise_level: float, noise_aug_type: str, generator: Generators = None) -> torch.Tensor:
    """Noise augmentation of the low-res latents (the original notebook's ``noise_aug_level``).

    "gaussian" adds ``noise_level``·N(0, 1); "fake" scales by sqrt(level² + 1) and adds no noise
    (it tells the model the input is noisy). Level 0 draws nothing and changes nothing.
    """
    if noise_aug_type not in NOISE_AUG_TYPES:
        raise ValueError(f"noise_aug_type {noise_aug_type!r} is not one of {NOISE_AUG_TYPES}")
    if noise_level == 0:
        return low_res
    if noise_aug_type == "gaussian":
        return low_res + noise_level * randn(low_res.shape, generator=generator, device=low_res.device, dtype=low_res.dtype)
    return low_res * (noise_level**2 + 1) ** 0.5


def prepare_conditioning(low_res: torch.Tensor, noise_level: torch.Tensor, pooled: torch.Tensor,
                         noise_embedding: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What the UNet gets besides the noisy latent, computed once per upscale.

    ``low_res``: SD latents (B, 4, h, w), scaled by the VAE's scaling_factor, already augmented;
    ``noise_level``: (B,) float32; ``pooled``: (B, C) pooled CLIP embedding. Returns
    ``low_res_cond`` (B, 4, 2h, 2w) and ``timestep_cond`` (B, 128 + C) in the dtype of ``pooled``.
    """
    c_in = 1 / (noise_level**2 + 1) ** 0.5  # the low-res input's own c_in (σ_data = 1)
    low_res_cond = F.interpolate(low_res, scale_factor=2, mode="nearest") * c_in[:, None, None, None]
    embedding = noise_level_embedding(noise_level, noise_embedding, pooled.dtype)
    return {"low_res_cond": low_res_cond.to(pooled.dtype), "timestep_cond": torch.cat([embedding, pooled], dim=1)}


class UpscalerConditioning(nn.Module):
    """F(x_scaled, c_noise; low_res_cond, encoder_hidden_states, timestep_cond) → 4 channels.

    ``low_res_cond``, ``timestep_cond``: from :func:`prepare_conditioning`. ``encoder_hidden_states``:
    CLIP token states (B, 77, C); ``encoder_attention_mask``: (B, 77) bool or None.

    Built once per upscale, it keeps what every step would otherwise recompute: the text's keys and
    values in every cross-attention layer (:meth:`KUNet.text_context`, reused while the same,
    unmodified ``encoder_hidden_states`` come back) and, for small latents (:data:`PACK_MAX_AREA`),
    oneDNN's packed copies of the channels-last convolution weights (:func:`~latent_upscaler.models.ops.packed_convolutions`). :meth:`release`
    frees both (so does dropping it, minus handing the memory back to the system).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self._text = None  # the TextContext of the last encoder_hidden_states
        self._packed: dict = {}  # packed convolution weights, filled at the first evaluation

    def release(self) -> None:
        """Free what the evaluations so far have kept; later evaluations compute it again."""
        self._text = None
        self._packed.clear()
        return_freed_memory()

    def _context(self, states: torch.Tensor):
        if not hasattr(self.unet, "text_context"):
            return states
        if self._text is None or not self._text.is_for(states):
            self._text = self.unet.text_context(states)
        return self._text

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
        small = unet_input.shape[-2] * unet_input.shape[-1] <= PACK_MAX_AREA
        with packed_convolutions(self._packed) if small else contextlib.nullcontext():
            out = self.unet(
                unet_input,
                c_noise,
                self._context(encoder_hidden_states),
                timestep_cond=timestep_cond,
                encoder_attention_mask=encoder_attention_mask,
            )
        return out[:, :-1]  # drop the log-variance channel
