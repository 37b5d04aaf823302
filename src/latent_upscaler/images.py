"""Everything between the user's images and the model's tensors: conversion, padding, cropping.

Inputs (one item or a list of them):
- ``torch.Tensor`` CHW or NCHW: 4 channels are SD latents (scaled by the VAE's scaling_factor, as a
  Stable Diffusion pipeline returns them with ``output_type="latent"``); 3 channels are RGB pixels
  and 1 channel grayscale pixels, in [0, 1] or in [-1, 1] (a batch with any negative value is taken
  as [-1, 1], as diffusers does).
- ``PIL.Image.Image``: pixels in any mode; RGBA and LA keep their alpha for the output.
- ``numpy.ndarray`` HW, HWC or NHWC: pixels, uint8 (0..255) or floats in [0, 1] (floats with
  negative values are taken as [-1, 1]); 4 channels are RGBA, never latents.

The model needs latents whose sides are multiples of 4 and at least 8 (UNet input multiples of 8 and
at least 16). Smaller or odd sizes are padded at the bottom and right and the output is cropped back
to exactly twice the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

VAE_SCALE = 8  # pixels per latent pixel (SD kl-f8 VAE)
LATENT_MULTIPLE = 4  # the K-UNet halves the (×2) latent three times
LATENT_MINIMUM = 8  # smaller latents break the UNet's reflect padding at its coarsest level
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclasses.dataclass
class PreparedImage:
    """A batch ready for the model, and what is needed to give the user back the same size.

    ``tensor``: float32 NCHW, padded; latents (``is_latent``) or pixels in [-1, 1].
    ``height``/``width``: the unpadded input size in pixels (latents: 8 × their size).
    ``alpha``: (N, 1, height, width) in [0, 1] for inputs with transparency, else None.
    """

    tensor: torch.Tensor
    is_latent: bool
    height: int
    width: int
    alpha: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.tensor.shape[0]


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def _pil_to_array(image) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """RGB floats in [0, 1] (H, W, 3) and alpha (H, W) or None."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    alpha = None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image).astype(np.float32) / 255.0, alpha


def _array_to_nhwc(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"numpy image has shape {array.shape}; expected HW, HWC or NHWC pixels")
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"numpy image has {array.shape[-1]} channels (last axis of shape {array.shape}); expected "
            "1 (grayscale), 3 (RGB) or 4 (RGBA), channels last"
        )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"numpy image has dtype {array.dtype}; use uint8 (0..255) or floats in [0, 1]")
    return array.astype(np.float32)


def _check_finite(tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError("image contains NaN or infinite values; pass finite pixels or latents")


def prepare_image(image: Any) -> PreparedImage:
    """Turn the user's ``image`` argument into a padded batch (see the module docstring)."""
    items: Sequence[Any] = image if isinstance(image, (list, tuple)) else [image]
    if len(items) == 0:
        raise ValueError("image is an empty list; pass at least one image or latent tensor")
    kinds = {type(_kind(x)) for x in items}
    if len(kinds) > 1:
        raise TypeError("a list of images must hold one kind only: all PIL images, all numpy arrays or all tensors")

    alpha = None
    if isinstance(items[0], torch.Tensor):
        tensors = [x if x.ndim == 4 else x.unsqueeze(0) for x in items]
        for t in tensors:
            if t.ndim != 4:
                raise ValueError(f"image tensor has shape {tuple(t.shape)}; expected CHW or NCHW")
        _same_size([tuple(t.shape[1:]) for t in tensors], "tensors (channels, height, width)")
        batch = torch.cat(tensors).float()
        _check_finite(batch)
        channels = batch.shape[1]
        if channels == 4:
            return _pad(PreparedImage(batch, True, VAE_SCALE * batch.shape[2], VAE_SCALE * batch.shape[3]))
        if channels not in (1, 3):
            raise ValueError(
                f"image tensor has {channels} channels; expected 3 (RGB pixels), 1 (grayscale pixels) "
                "or 4 (SD latents)"
            )
        pixels = batch
    else:
        if _is_pil(items[0]):
            arrays, alphas = zip(*(_pil_to_array(x) for x in items))
            _same_size([a.shape for a in arrays], "images (height, width)")
            nhwc = np.stack(arrays)
            if any(a is not None for a in alphas):
                alpha = np.stack([a if a is not None else np.ones(arr.shape[:2], np.float32) for a, arr in zip(alphas, arrays)])
        elif isinstance(items[0], np.ndarray):
            arrays = [_array_to_nhwc(x) for x in items]
            _same_size([a.shape[1:3] for a in arrays], "arrays (height, width)")
            if len({a.shape[-1] for a in arrays}) > 1:
                raise ValueError("numpy images in one list must have the same number of channels")
            nhwc = np.concatenate(arrays)
            if nhwc.shape[-1] == 4:
                alpha, nhwc = nhwc[..., 3].copy(), nhwc[..., :3]
        else:
            raise TypeError(
                f"image of type {type(items[0]).__name__} is not supported; pass a PIL image, a numpy "
                "array, a torch tensor, or a list of one of these"
            )
        pixels = torch.from_numpy(np.ascontiguousarray(nhwc)).permute(0, 3, 1, 2)
        _check_finite(pixels)
        if alpha is not None:
            alpha = torch.from_numpy(np.ascontiguousarray(alpha))[:, None].clamp(0, 1)

    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.min() >= 0:  # [0, 1] → [-1, 1]; a batch with negative values already is in [-1, 1]
        pixels = 2.0 * pixels - 1.0
    return _pad(PreparedImage(pixels.contiguous(), False, pixels.shape[2], pixels.shape[3], alpha))


def _kind(x: Any) -> Any:
    return "pil" if _is_pil(x) else x


def _same_size(shapes: List[tuple], what: str) -> None:
    if len(set(tuple(s) for s in shapes)) > 1:
        raise ValueError(f"all {what} in one call must have the same size, got {sorted(set(map(tuple, shapes)))}")


def padded_size(size: int, multiple: int, minimum: int) -> int:
    return max(minimum, -(-size // multiple) * multiple)


def _pad(prepared: PreparedImage) -> PreparedImage:
    unit = 1 if prepared.is_latent else VAE_SCALE
    t = prepared.tensor
    if not prepared.is_latent and min(t.shape[2:]) < 1:
        raise ValueError("image has a zero-sized side")
    height = padded_size(t.shape[2], LATENT_MULTIPLE * unit, LATENT_MINIMUM * unit)
    width = padded_size(t.shape[3], LATENT_MULTIPLE * unit, LATENT_MINIMUM * unit)
    prepared.tensor = pad_bottom_right(t, height, width)
    return prepared


def pad_bottom_right(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad NCHW ``x`` to (height, width): mirrored where the image is large enough, else repeated."""
    pad_h, pad_w = height - x.shape[2], width - x.shape[3]
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < x.shape[2] and pad_w < x.shape[3] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def check_output_type(output_type: str) -> str:
    if output_type == "numpy":  # diffusers' old spelling
        return "np"
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}")
    return output_type


def crop_latents(latents: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
    """The upscaled latents that cover exactly twice the input (NCHW, scaled like SD latents)."""
    height = -(-2 * prepared.height // VAE_SCALE)
    width = -(-2 * prepared.width // VAE_SCALE)
    return latents[:, :, :height, :width]


def postprocess(pixels: torch.Tensor, prepared: PreparedImage, output_type: str) -> Any:
    """Decoded pixels in [-1, 1] (NCHW, padded) → the user's output of exactly twice the input size.

    "pt": float NCHW in [0, 1]; "np": float32 NHWC in [0, 1]; "pil": a list of PIL images.
    Inputs with alpha get a 4th channel: the input's alpha, resized ×2 (bicubic).
    """
    pixels = pixels[:, :, : 2 * prepared.height, : 2 * prepared.width]
    images = (pixels / 2 + 0.5).clamp(0, 1)
    if prepared.alpha is not None:
        alpha = F.interpolate(prepared.alpha, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
        images = torch.cat([images, alpha.to(images.device, images.dtype)], dim=1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return numpy_to_pil(array)


def numpy_to_pil(images: np.ndarray) -> list:
    """NHWC (or HWC) floats in [0, 1] → a list of PIL images (RGB, RGBA or L by channel count)."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None, ...]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]
