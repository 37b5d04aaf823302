"""AutoencoderKL: the Stable Diffusion kl-f8 VAE (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", §3 and appendix G), with diffusers' module names and API.

    encode: pixels (B, 3, H, W) → conv_in → down blocks (resnets, stride-2 conv) → mid (resnet,
            attention, resnet) → norm, SiLU, conv_out → quant_conv → DiagonalGaussianDistribution
    decode: latents (B, 4, H/8, W/8) → post_quant_conv → conv_in → mid → up blocks (resnets,
            nearest ×2 + conv) → norm, SiLU, conv_out → pixels

Latents at this boundary are *not* scaled by ``config.scaling_factor``: the caller multiplies after
encoding and divides before decoding, as with diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import ClassVar, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import ConfigError, ModelConfig
from ..randomness import Generators, randn
from ..streaming import STREAM_MIN_PIXELS, hooked, streamed_decode
from ..tiling import check_group_norm, tiled_decode, tiled_encode
from .base import ModelBase
from .layers import SwitchableAttention, attention_layers, check_xformers
from .ops import Conv2d, activation_, add_into

#: diffusers' ``get_activation`` names → modules (the resnets use ``act_fn``; the output heads always SiLU)
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
#: GroupNorm epsilon of every norm in the VAE (fixed in diffusers' Encoder/Decoder)
NORM_EPS = 1e-6


@dataclasses.dataclass
class VAEConfig(ModelConfig):
    """``vae/config.json`` of diffusers' ``AutoencoderKL``; defaults are the SD kl-f8 VAE of the hub folder."""

    CLASS_NAME: ClassVar[str] = "AutoencoderKL"

    in_channels: int = 3  # RGB pixels
    out_channels: int = 3  # RGB pixels
    down_block_types: List[str] = dataclasses.field(default_factory=lambda: ["DownEncoderBlock2D"] * 4)  # one per level
    up_block_types: List[str] = dataclasses.field(default_factory=lambda: ["UpDecoderBlock2D"] * 4)  # one per level
    # channel widths per level, fine → coarse; the latent is 2^(levels - 1) times smaller than the image
    block_out_channels: List[int] = dataclasses.field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more
    act_fn: str = "silu"  # resnet nonlinearity
    latent_channels: int = 4  # SD latent channels
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    sample_size: Union[int, List[int]] = 512  # tile size for diffusers' tiled VAE; unused here, kept for round trip
    scaling_factor: float = 0.18215  # latent std of SD 1.x; applied by the caller, not by encode/decode
    shift_factor: Optional[float] = None  # latent shift (SD3/Flux VAEs); applied by the caller, not here
    latents_mean: Optional[List[float]] = None  # per-channel latent statistics (SDXL-era); caller's business
    latents_std: Optional[List[float]] = None  # per-channel latent statistics (SDXL-era); caller's business
    force_upcast: bool = True  # diffusers pipelines' hint to run the VAE in fp32; kept for round trip
    use_quant_conv: bool = True  # 1×1 conv on the posterior moments
    use_post_quant_conv: bool = True  # 1×1 conv on the latents before decoding
    mid_block_add_attention: bool = True  # self-attention between the two mid-block resnets

    def validate(self, source: str = "config") -> None:
        levels = len(self.block_out_channels)
        for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            wrong = sorted({t for t in types if t != allowed})
            if wrong:
                raise ConfigError(f"{source}: field {name!r} contains {wrong}; only {allowed!r} is supported")
            if len(types) != levels:
                raise ConfigError(
                    f"{source}: field {name!r} has {len(types)} entries but block_out_channels has {levels}"
                )
        if str(self.act_fn).lower() not in ACTIVATIONS:
            raise ConfigError(f"{source}: field 'act_fn' = {self.act_fn!r}; expected one of {sorted(ACTIVATIONS)}")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ConfigError(
                    f"{source}: field 'norm_num_groups' = {self.norm_num_groups} does not divide the "
                    f"block_out_channels width {width}"
                )


# --------------------------------------------------------------------------------------------------
# Outputs and the posterior


class _Output:
    """diffusers' ``BaseOutput`` habits that callers rely on: ``out[0]`` and ``out.to_tuple()``."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, index: int):
        return self.to_tuple()[index]


@dataclasses.dataclass
class DecoderOutput(_Output):
    sample: torch.Tensor  # pixels in about [-1, 1], NCHW, the model's dtype


@dataclasses.dataclass
class AutoencoderKLOutput(_Output):
    latent_dist: "DiagonalGaussianDistribution"


class DiagonalGaussianDistribution:
    """The posterior q(z | x) = N(mean, exp(logvar)) over unscaled latents, NCHW.

    ``parameters`` holds mean and log-variance stacked along channels (the output of ``quant_conv``).
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # as diffusers and the LDM code
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """mean + std · ε, with ε drawn by :func:`latent_upscaler.randomness.randn` (seeds match diffusers)."""
        noise = randn(self.mean.shape, generator, device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


# --------------------------------------------------------------------------------------------------
# Layers (names give diffusers' state-dict keys)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block without time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity_ = activation_(act_fn)  # in place: its inputs are fresh norm outputs
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity_(self.norm1(x)))
        h = self.conv2(self.nonlinearity_(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return add_into(skip, h, fresh=h)  # in place when that changes nothing: less peak memory


class SelfAttention(SwitchableAttention):
    """Single-head spatial self-attention with a residual, over all H·W positions."""

    heads = 1

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        attended = self.attend(q, k, v).squeeze(1)  # softmax(q kᵀ / √C) v
        out = self.to_out[0](attended).transpose(1, 2).reshape(b, c, h, w)  # channels-last view
        return add_into(out, x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one zero row/column at the bottom/right (as the LDM code)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    """diffusers' ``DownEncoderBlock2D``: resnets, then an optional downsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, downsample: bool, groups: int, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """diffusers' ``UpDecoderBlock2D``: resnets, then an optional upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, upsample: bool, groups: int, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` as the VAE uses it: resnet, (attention,) resnet."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, act_fn) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Pixels (B, in_channels, H, W) → posterior moments (B, 2·latent_channels, H/f, W/f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups, act = config.block_out_channels, config.norm_num_groups, config.act_fn
        self.conv_in = Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        levels = len(widths)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, i < levels - 1, groups, act)
            for i in range(levels)
        )
        self.mid_block = MidBlock(widths[-1], groups, act, config.mid_block_add_attention)
        self.conv_norm_out = _group_norm(widths[-1], groups)
        self.conv_act = nn.SiLU(inplace=True)
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) → pixels (B, out_channels, h·f, w·f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))
        groups, act = config.norm_num_groups, config.act_fn
        self.conv_in = Conv2d(config.latent_channels, widths[0], kernel_size=3, padding=1)
        levels, layers = len(widths), config.layers_per_block + 1
        self.up_blocks = nn.ModuleList(  # registered before mid_block, so keys are in diffusers' order
            UpDecoderBlock(widths[max(i - 1, 0)], widths[i], layers, i < levels - 1, groups, act)
            for i in range(levels)
        )
        self.mid_block = MidBlock(widths[0], groups, act, config.mid_block_add_attention)
        self.conv_norm_out = _group_norm(widths[-1], groups)
        self.conv_act = nn.SiLU(inplace=True)
        self.conv_out = Conv2d(widths[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------------
# The model


#: attention projections of diffusers ≤ 0.13 folders (``AttentionBlock``) → today's ``Attention`` names;
#: ``group_norm`` kept its name
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_PARAM = re.compile(r"^(?P<block>.*\.attentions\.\d+)\.(?P<name>[a-z_]+(?:\.0)?)\.(?P<param>weight|bias)$")


class AutoencoderKL(ModelBase):
    """The SD VAE with diffusers' state-dict keys and ``encode``/``decode`` API."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = Conv2d(2 * latent, 2 * latent, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(latent, latent, kernel_size=1) if config.use_post_quant_conv else None
        self.use_slicing = False  # encode/decode one image of a batch at a time
        self.use_tiling = False  # encode/decode large images in tiles (enable_tiling)
        self.tile_size, self.tile_overlap, self.tile_group_norm = 64, 8, "global"  # set by enable_tiling
        # decode outputs of at least this many pixels in row bands (latent_upscaler.streaming: the same
        # pixels, less memory, the same time on the CPU); None: always in one pass
        self.stream_min_pixels: Optional[int] = STREAM_MIN_PIXELS

    @classmethod
    def convert_state_dict(cls, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rename legacy attention keys (:data:`LEGACY_ATTENTION_NAMES`) and squeeze their 1×1-conv
        shaped weights ``(C, C, 1, 1)`` to linear ``(C, C)``; other keys pass unchanged."""
        projections = set(LEGACY_ATTENTION_NAMES.values())
        converted = {}
        for key, tensor in state_dict.items():
            match = _ATTENTION_PARAM.match(key)
            if match:
                name = LEGACY_ATTENTION_NAMES.get(match["name"], match["name"])
                key = f"{match['block']}.{name}.{match['param']}"
                if name in projections and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
                    tensor = tensor[:, :, 0, 0]
            converted[key] = tensor
        return converted

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Union[AutoencoderKLOutput, Tuple]:
        """Pixels in [-1, 1], NCHW (H, W multiples of 8 for SD), the model's dtype → the posterior over
        *unscaled* latents (multiply a sample by ``config.scaling_factor`` before the UNet)."""
        self._check_channels(x, self.config.in_channels, "image", "pixels in [-1, 1]")
        moments = self._per_image(self._tiled(tiled_encode, self.encoder, x.shape[-2:], self._scale), x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: Generators = None
    ) -> Union[DecoderOutput, Tuple]:
        """*Unscaled* latents, NCHW (divide UNet latents by ``config.scaling_factor`` first) → pixels in
        about [-1, 1], NCHW. ``generator`` is accepted for diffusers compatibility and unused."""
        self._check_channels(z, self.config.latent_channels, "latents", "unscaled VAE latents")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        network = self._tiled(tiled_decode, self.decoder, z.shape[-2:], 1)
        if network is self.decoder and self.streams(z):
            network = functools.partial(streamed_decode, self.decoder)
        sample = self._per_image(network, z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def streams(self, z: torch.Tensor) -> bool:
        """Whether an untiled decode of latents ``z`` runs in row bands (:mod:`latent_upscaler.streaming`):
        on the CPU, without gradients, for outputs of at least ``stream_min_pixels`` pixels, and not
        while hooks (CPU offload) wrap the decoder's layers, whose weights the bands read directly."""
        pixels = z.shape[-2] * z.shape[-1] * self._scale**2
        return (self.stream_min_pixels is not None and pixels >= self.stream_min_pixels and z.device.type == "cpu"
                and not torch.is_grad_enabled() and not hooked(self.decoder))

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: Generators = None,
    ) -> Union[DecoderOutput, Tuple]:
        """Reconstruct pixels: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    # ---- switches (diffusers' names) ----

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time: peak memory of one image, same results."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int = 64, overlap: int = 8, group_norm: str = "global") -> None:
        """Encode and decode images larger than ``tile_size`` latent pixels (8× as many image pixels)
        in overlapping tiles blended with smooth weights: memory grows with the tile, not the image.

        ``overlap``: latent pixels shared by neighbouring tiles. ``group_norm``: how the GroupNorm
        layers of the tiled blocks are normalised: "global" with the exact whole-image statistics,
        the same in every tile, so tiles cannot differ in tone (a pass over the tiles per layer:
        about 5× the work of one pass); "sampled" with statistics measured over an evenly spread
        subset of the tiles (:func:`~latent_upscaler.tiling.spread_tiles`; exact up to 3 tiles per
        axis, else about 1.5× the work, one tone for all tiles but an estimate of the image's:
        README "Large images" measures how far off); "tile" with each tile's own (one pass, as
        diffusers: tiles can differ in tone). The mid-block's self-attention always sees the whole
        latent. See :mod:`latent_upscaler.tiling`.
        """
        if tile_size < 1 or not 0 <= overlap < tile_size:
            raise ValueError(f"tile_size {tile_size} and overlap {overlap} must satisfy 0 ≤ overlap < tile_size")
        check_group_norm(group_norm)
        self.use_tiling = True
        self.tile_size, self.tile_overlap, self.tile_group_norm = tile_size, overlap, group_norm

    def disable_tiling(self) -> None:
        """Encode and decode in one pass again (exact, memory grows with the image)."""
        self.use_tiling = False

    @property
    def _scale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _tiled(self, tiled_fn, network: nn.Module, size, scale: int):
        """``network``, or its tiled version when tiling is on and the image is larger than a tile."""
        fits = max(size) <= self.tile_size * scale
        if not self.use_tiling or fits or size[0] % scale or size[1] % scale:
            return network
        return lambda x: tiled_fn(network, x, self.tile_size, self.tile_overlap, self.tile_group_norm)

    def _per_image(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.use_slicing or x.shape[0] == 1:
            return network(x)
        return torch.cat([network(item) for item in x.split(1)])

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """Route the mid-block attention through xformers (needs xformers and a CUDA GPU) or back to SDPA."""
        if valid:
            check_xformers(attention_op)
        for _, layer in attention_layers(self):
            layer.set_use_memory_efficient_attention_xformers(valid, attention_op)

    @staticmethod
    def _check_channels(x: torch.Tensor, expected: int, what: str, meaning: str) -> None:
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(
                f"{what} has shape {tuple(x.shape)}; expected (batch, {expected}, height, width) {meaning}"
            )
