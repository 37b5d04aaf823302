"""The original k-diffusion release of the SD x2 latent upscaler, loaded into our K-UNet.

Katherine Crowson's release is a k-diffusion JSON config (``config_laion_text_cond_latent_upscaler_2.json``)
and a checkpoint whose ``model_ema`` holds the state of the notebook's wrapper::

    NoiseLevelAndTextConditionedUpscaler    low_res_noise_embed.weight   (n, 1) Fourier frequencies of
                                                                         the noise-augmentation level
      └ inner_model: ImageDenoiserModelV1   inner_model.*                 the UNet, mapped to ours here

``ImageDenoiserModelV1`` computes what diffusers' ``UNet2DConditionModel`` with K blocks computes
(diffusers added those blocks for this model): the key tables below rename its modules, split its
fused q/k/v projections and drop the singleton axes of its 1×1 convolutions. Its resampling kernels
are fixed [1, 3, 3, 1]/8 filters, checked and dropped (ours are built in). The wrapper's
``low_res_noise_embed.weight`` is no UNet weight; diffusers' conversion loses it, we hand it back.

The shipped config is the release's ``model`` section as vendored in imaginAIry
(``imaginairy/enhancers/upscalers/riverwing.py``); the release's other sections are training
settings. No code runs from a checkpoint: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..configuration import ConfigError
from ..models.base import WeightsMismatchError, no_weight_init
from ..models.layers import GROUP_SIZE
from ..models.unet import KUNet, UNetConfig, plan_blocks

#: the released model's config (the ``model`` section of config_laion_text_cond_latent_upscaler_2.json)
ORIGINAL_CONFIG = os.path.join(os.path.dirname(__file__), "config_laion_text_cond_latent_upscaler_2.json")

#: k-diffusion's image_v1 attention has heads of 64 channels (``max(1, width // 64)`` heads)
HEAD_SIZE = 64

INNER = "inner_model."  # the wrapper's prefix of every UNet weight
NOISE_EMBED = "low_res_noise_embed.weight"  # the wrapper's own buffer

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class OriginalModelConfig:
    """The ``model`` section of a k-diffusion ``image_v1`` config; defaults are k-diffusion's own.

    Only what shapes the UNet is used; the training fields are kept so that a release config reads
    without error.
    """

    # model family; only "image_v1" (ImageDenoiserModelV1) exists for this UNet
    type: str
    # channels of the denoised latents (SD latents: 4)
    input_channels: int
    # width of the noise-level embedding and of the mapping network (768); diffusers derives it as
    # 2 * channels[0]
    mapping_out: int
    # resnets per level, shallowest first ([4, 4, 4, 4])
    depths: List[int]
    # channels per level, shallowest first ([384, 384, 768, 768])
    channels: List[int]
    # self-attention after each resnet at this level ([F, F, F, T])
    self_attn_depths: List[bool]
    # cross-attention to the text after each resnet at this level ([F, T, T, T])
    cross_attn_depths: Optional[List[bool]] = None
    # width of the extra condition of the mapping network: noise-augmentation features (128) then
    # the pooled CLIP embedding (768); 0 for none
    mapping_cond_dim: int = 0
    # channels concatenated to the input: the upscaled low-res latents (4)
    unet_cond_dim: int = 0
    # width of the text states attended to (CLIP ViT-L/14: 768); 0 for none
    cross_cond_dim: int = 0
    # one more output channel: a log-variance (training only)
    has_variance: bool = False
    # pixel-unshuffle factor before proj_in; our UNet has none (1)
    patch_size: int = 1
    # levels skipped at the top of the U; our UNet skips none (0)
    skip_stages: int = 0
    # k-diffusion's KarrasAugmentWrapper around the UNet (an extra mapping condition)
    augment_wrapper: bool = True
    # data standard deviation of the Karras preconditioning; our denoiser uses 1
    sigma_data: float = 1.0
    # training only: dropout (no effect at inference), augmentation, crop size, noise levels, loss
    dropout_rate: float = 0.0
    augment_prob: float = 0.0
    input_size: Optional[List[int]] = None
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    sigma_sample_density: Optional[Dict[str, Any]] = None
    loss_config: str = "karras"
    loss_weighting: str = "karras"
    loss_scales: int = 1

    REQUIRED: ClassVar[Tuple[str, ...]] = (
        "type", "input_channels", "mapping_out", "depths", "channels", "self_attn_depths",
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "OriginalModelConfig":
        """From a whole k-diffusion config (its ``model`` section is read) or the section itself."""
        if isinstance(raw.get("model"), Mapping):
            raw = raw["model"]
        if "type" in raw and raw["type"] != "image_v1":
            raise ConfigError(f"{source}: field 'type' = {raw['type']!r} is not supported; only k-diffusion's "
                              "'image_v1' (ImageDenoiserModelV1) is the latent upscaler's UNet")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                raise ConfigError(f"{source}: unknown field {key!r} in the model section; k-diffusion's image_v1 "
                                  f"has {', '.join(names)}")
        for key in cls.REQUIRED:
            if key not in raw:
                raise ConfigError(f"{source}: field {key!r} is missing; k-diffusion's image_v1 requires it")
        config = cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()})
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: PathLike) -> "OriginalModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a JSON object (a k-diffusion config or its model section)")
        return cls.from_dict(raw, source=os.fspath(path))

    def to_unet_config(self) -> UNetConfig:
        """The diffusers ``UNet2DConditionModel`` config that computes what this UNet computes."""
        self.validate()
        return self._unet_config()

    def validate(self, source: str = "config") -> None:
        """Raise :class:`ConfigError` naming the field for what our K-UNet cannot compute."""

        def fail(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field {field!r} = {getattr(self, field)!r} {why}")

        for field in ("input_channels", "mapping_out"):
            if not _is_int(getattr(self, field), 1):
                raise fail(field, "must be a positive integer")
        for field in ("mapping_cond_dim", "unet_cond_dim", "cross_cond_dim"):
            if not _is_int(getattr(self, field), 0):
                raise fail(field, "must be a non-negative integer")
        n = len(self.channels) if isinstance(self.channels, list) else 0
        if n == 0 or not all(_is_int(c, 1) for c in self.channels):
            raise fail("channels", "must be a non-empty list of positive integers")
        if not isinstance(self.depths, list) or len(self.depths) != n or not all(_is_int(d, 1) for d in self.depths):
            raise fail("depths", f"must list a positive number of resnets for each of the {n} levels")
        for field in ("self_attn_depths", "cross_attn_depths"):
            flags = getattr(self, field)
            if not isinstance(flags, list) or len(flags) != n or not all(isinstance(f, bool) for f in flags):
                raise fail(field, f"must list true/false for each of the {n} levels")
        if not isinstance(self.has_variance, bool):
            raise fail("has_variance", "must be true or false")

        # what the K-UNet (diffusers' K blocks) has no counterpart for
        if self.patch_size != 1:
            raise fail("patch_size", "is not supported; the K-UNet has no pixel (un)shuffle around proj_in/proj_out")
        if self.skip_stages != 0:
            raise fail("skip_stages", "is not supported; the K-UNet runs every level")
        if self.augment_wrapper is not False:
            raise fail("augment_wrapper", "is not supported (k-diffusion's default is true): the K-UNet has no "
                       "KarrasAugmentWrapper; the upscaler's config sets it to false")
        if self.sigma_data != 1.0:
            raise fail("sigma_data", "is not supported; the K-UNet's preconditioning (as diffusers') uses 1")
        if self.mapping_out != 2 * self.channels[0]:
            raise fail("mapping_out", f"is not 2 * channels[0] = {2 * self.channels[0]}; diffusers' Fourier "
                       "time embedding has channels[0] frequencies, so that is its width")
        if self.cross_cond_dim == 0:
            raise fail("cross_cond_dim", "is 0 (no text); the K-UNet's attention blocks always attend to text")
        if not self.cross_attn_depths[-1]:
            raise fail("cross_attn_depths", "has no cross-attention at the deepest level; diffusers' K blocks put "
                       "the deepest level's self-attention in a cross-attention block")
        if self.self_attn_depths != [False] * (n - 1) + [True]:
            raise fail("self_attn_depths", "is not self-attention at the deepest level only, the only place "
                       "diffusers' K blocks have it")
        for level, cross in enumerate(self.cross_attn_depths):
            widths = {self.channels[level], self.channels[max(level - 1, 0)]} if cross else set()
            for width in sorted(widths):
                if width % HEAD_SIZE:
                    raise fail("channels", f"gives an attention {width} channels wide at level {level}; the "
                               f"original splits it into one head of {width}, the K-UNet into heads of "
                               f"{HEAD_SIZE} channels, so attention widths must be multiples of {HEAD_SIZE}")
        try:
            unet = self._unet_config()
            unet.validate("the equivalent diffusers UNet config")
        except ConfigError as e:
            raise fail("channels", f"(with these depths and attention depths) cannot be built from diffusers' "
                       f"K blocks: {e}") from None
        ours, theirs = _our_topology(unet), _original_topology(self)
        for (where, a), (_, b) in zip(theirs, ours):
            if a != b:
                raise fail("channels", f"gives at {where} {_describe(a)} in the original but {_describe(b)} in "
                           "diffusers' K blocks, whose block roles follow from coincidences of the widths")
        assert len(ours) == len(theirs)

    def _unet_config(self) -> UNetConfig:
        depths = self.depths
        return UNetConfig(
            in_channels=self.input_channels + self.unet_cond_dim,  # noisy input, then unet_cond
            out_channels=self.input_channels + int(self.has_variance),  # denoised, then log-variance
            block_out_channels=list(self.channels),
            layers_per_block=depths[0] if len(set(depths)) == 1 else list(depths),
            down_block_types=["KCrossAttnDownBlock2D" if c else "KDownBlock2D" for c in self.cross_attn_depths],
            up_block_types=["KCrossAttnUpBlock2D" if c else "KUpBlock2D" for c in reversed(self.cross_attn_depths)],
            attention_head_dim=HEAD_SIZE,
            cross_attention_dim=self.cross_cond_dim,
            time_embedding_type="fourier",
            flip_sin_to_cos=True,  # FourierFeatures: [cos, sin]
            act_fn="gelu",
            timestep_post_act="gelu",  # MappingNet: Linear, GELU, Linear, GELU
            time_cond_proj_dim=self.mapping_cond_dim or None,
            conv_in_kernel=1,
            conv_out_kernel=1,
            norm_num_groups=None,  # proj_out reads the last block's output directly
            norm_eps=1e-5,
            center_input_sample=False,
        )


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# Both models described alike, layer by layer: (resnet in, mid, out channels, norm1 groups, norm2
# groups, self-attention (width, heads, head size) or None, cross-attention likewise), with a flag
# for the skip an up level concatenates first.
_Layer = Tuple[int, int, int, int, int, Optional[Tuple[int, int, int]], Optional[Tuple[int, int, int]]]


def _original_topology(config: OriginalModelConfig) -> List[Tuple[str, Tuple[bool, Tuple[_Layer, ...]]]]:
    """ImageDenoiserModelV1's levels as k-diffusion's image_v1.py builds them."""
    c, n = config.channels, len(config.channels)

    def groups(width: int) -> int:
        return max(1, width // GROUP_SIZE)

    def attention(width: int, on: bool) -> Optional[Tuple[int, int, int]]:
        heads = max(1, width // HEAD_SIZE)
        return (width, heads, width // heads) if on else None

    def level(name: str, level: int, c_in: int, c_out: int, skip: bool):
        layers = []
        for j in range(config.depths[level]):
            res_in = c_in if j == 0 else c[level]
            res_out = c_out if j == config.depths[level] - 1 else c[level]
            layers.append((res_in, c[level], res_out, groups(res_in), groups(c[level]),
                           attention(res_out, config.self_attn_depths[level]),
                           attention(res_out, config.cross_attn_depths[level])))
        return f"{name} level {level}", (skip, tuple(layers))

    down = [level("down", i, c[max(i - 1, 0)], c[i], False) for i in range(n)]
    up = [level("up", i, 2 * c[i] if i < n - 1 else c[i], c[max(i - 1, 0)], i < n - 1) for i in reversed(range(n))]
    return down + up


def _our_topology(config: UNetConfig) -> List[Tuple[str, Tuple[bool, Tuple[_Layer, ...]]]]:
    """The same description of the UNet that :func:`plan_blocks` lays out (diffusers' blocks)."""
    down, up = plan_blocks(config)
    n = len(down)

    def layers(block) -> Tuple[_Layer, ...]:
        out = []
        for res, attn in block.layers:
            spec = None if attn is None else (attn.dim, attn.dim // attn.head_dim, attn.head_dim)
            out.append((res.in_channels, res.mid_channels, res.out_channels, res.groups_in, res.groups_mid,
                        spec if attn is not None and attn.self_attention else None, spec))
        return tuple(out)

    return ([(f"down level {i}", (False, layers(b))) for i, b in enumerate(down)]
            + [(f"up level {n - 1 - i}", (b.skip, layers(b))) for i, b in enumerate(up)])


def _describe(level: Tuple[bool, Tuple[_Layer, ...]]) -> str:
    skip, layers = level
    parts = []
    for c_in, mid, out, _, _, self_attn, cross in layers:
        part = f"resnet {c_in}→{mid}→{out}"
        if self_attn:
            part += f" + self-attention {self_attn[1]}×{self_attn[2]}"
        if cross:
            part += f" + cross-attention {cross[1]}×{cross[2]}"
        parts.append(part)
    return ("[skip concatenated] " if skip else "") + "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Key tables: original module (below ``inner_model.``) -> our module (diffusers' naming). Parameter
# names (``weight``, ``bias``) carry over. A tuple of targets splits the original tensor into equal
# parts along its first axis (fused projections); the last column lists the trailing singleton
# axes of the original *weight* that ours lacks (1×1 convolution -> Linear, (n, 1) buffer -> (n,)).

TOP_LEVEL = (
    ("timestep_embed", "time_proj", (1,)),  # FourierFeatures(1, 768) buffer -> GaussianFourierProjection
    ("mapping_cond", "time_embedding.cond_proj", ()),
    ("mapping.0", "time_embedding.linear_1", ()),
    ("mapping.2", "time_embedding.linear_2", ()),
    ("proj_in", "conv_in", ()),
    ("proj_out", "conv_out", ()),
)
RESNET = (  # ResConvBlock -> ResnetBlockCondNorm2D
    ("main.0.mapper", "norm1.linear", ()),  # AdaGN
    ("main.2", "conv1", ()),
    ("main.4.mapper", "norm2.linear", ()),
    ("main.6", "conv2", ()),
    ("skip", "conv_shortcut", ()),  # only where the channels change
)
SELF_ATTENTION = (  # SelfAttention2d -> KAttentionBlock's first half
    ("norm_in.mapper", "norm1.linear", ()),
    ("qkv_proj", ("attn1.to_q", "attn1.to_k", "attn1.to_v"), (1, 1)),
    ("out_proj", "attn1.to_out.0", (1, 1)),
)
CROSS_ATTENTION = (  # CrossAttention2d -> KAttentionBlock's second half
    ("norm_dec.mapper", "norm2.linear", ()),
    ("norm_enc", "attn2.norm_cross", ()),
    ("q_proj", "attn2.to_q", (1, 1)),
    ("kv_proj", ("attn2.to_k", "attn2.to_v"), ()),  # already a Linear
    ("out_proj", "attn2.to_out.0", (1, 1)),
)
PARAMETERS = ("weight", "bias")


@dataclasses.dataclass(frozen=True)
class KeyRow:
    """One original tensor and the tensors of ours it becomes."""

    original: str  # full key, ``inner_model.…``
    ours: Tuple[str, ...]  # one, or the parts of a fused projection in order
    original_shape: Tuple[int, ...]


@dataclasses.dataclass
class OriginalLayout:
    """Every key the original checkpoint of a config holds, and how each maps to ours."""

    rows: List[KeyRow]
    #: resampler kernel buffers -> the 4×4 kernel our resampler there applies (checked, dropped)
    kernels: Dict[str, torch.Tensor]
    #: the wrapper's noise-augmentation frequencies: (mapping_cond_dim - cross_cond_dim) / 2 of them
    noise_embed_shape: Tuple[int, ...]

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Original key -> shape, the kernels and the wrapper's buffer included."""
        out = {row.original: row.original_shape for row in self.rows}
        out.update({key: tuple(kernel.shape) for key, kernel in self.kernels.items()})
        out[NOISE_EMBED] = self.noise_embed_shape
        return out


def original_layout(config: OriginalModelConfig, unet: KUNet) -> OriginalLayout:
    """The original keys of ``config`` with the shapes of ``unet`` (built from ``config``; the meta
    device does for keys and shapes)."""
    own = {key: tuple(value.shape) for key, value in unet.state_dict().items()}
    modules: List[Tuple[str, str, tuple]] = [("", "", TOP_LEVEL)]
    kernels: Dict[str, torch.Tensor] = {}
    n = len(config.channels)

    def level(original: str, ours: str, level: int, first_index: int) -> int:
        index = first_index
        for j in range(config.depths[level]):
            modules.append((f"{original}.{index}.", f"{ours}.resnets.{j}.", RESNET))
            index += 1
            for present, table in ((config.self_attn_depths[level], SELF_ATTENTION),
                                   (config.cross_attn_depths[level], CROSS_ATTENTION)):
                if present:
                    modules.append((f"{original}.{index}.", f"{ours}.attentions.{j}.", table))
                    index += 1
        return index

    for i in range(n):  # d_blocks[i][0]: the downsampler into level i (Identity at level 0)
        level(f"u_net.d_blocks.{i}", f"down_blocks.{i}", i, first_index=1)
        if i > 0:
            kernels[f"{INNER}u_net.d_blocks.{i}.0.kernel"] = unet.down_blocks[i - 1].downsamplers[0].kernel[0, 0]
    for k in range(n):  # u_blocks are stored deepest first, as diffusers' up_blocks; the upsampler last
        last = level(f"u_net.u_blocks.{k}", f"up_blocks.{k}", n - 1 - k, first_index=0)
        if k < n - 1:
            kernels[f"{INNER}u_net.u_blocks.{k}.{last}.kernel"] = unet.up_blocks[k].upsamplers[0].kernel[0, 0]

    rows = []
    for original_prefix, our_prefix, table in modules:
        for original, ours, axes in table:
            targets = (ours,) if isinstance(ours, str) else ours
            for param in PARAMETERS:
                keys = tuple(f"{our_prefix}{t}.{param}" for t in targets)
                present = [k in own for k in keys]
                if not any(present):
                    continue
                assert all(present), f"fused parts {keys} only partly exist"
                shape = (sum(own[k][0] for k in keys),) + own[keys[0]][1:]
                if param == "weight":
                    shape += axes
                rows.append(KeyRow(f"{INNER}{original_prefix}{original}.{param}", keys, shape))
    covered = [k for row in rows for k in row.ours]
    assert sorted(covered) == sorted(own), "the key tables do not cover the K-UNet exactly"
    noise_dim = config.mapping_cond_dim - config.cross_cond_dim
    return OriginalLayout(rows, kernels, (max(noise_dim, 0) // 2, 1))


# ------------------------------------------------------------------------------------------------
# Reading and converting


def read_checkpoint(path: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict of an original checkpoint, keys as saved (``inner_model.…``).

    ``.safetensors``: the file's tensors. Anything else (``.pth``, ``.ckpt``): ``torch.load`` with
    ``weights_only=True``, then its ``model_ema`` (the weights the release samples with), else
    ``model`` (a training checkpoint without EMA), else ``state_dict``, else the dict itself.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and containers, and pickled code is never "
                         f"run here (torch.load weights_only=True); re-save just the state dict: {e}") from None
    if isinstance(raw, Mapping):
        for section in ("model_ema", "model", "state_dict"):
            if isinstance(raw.get(section), Mapping):
                raw = raw[section]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors, or one under 'model_ema')")
    others = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"{path}: the state dict holds non-tensor entries: {', '.join(others[:8])}")
    return dict(raw)


def convert_original_state_dict(
    state: Mapping[str, torch.Tensor], config: OriginalModelConfig, unet: KUNet, *, source: str = "checkpoint"
) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Our UNet's state dict from an original one, and the wrapper's ``low_res_noise_embed.weight``
    (None if the checkpoint has no such wrapper).

    Raises :class:`WeightsMismatchError` naming, in the original's keys, what is missing,
    unexpected or of the wrong shape, and kernels other than the fixed filters.
    """
    layout = original_layout(config, unet)
    expected = layout.shapes
    missing = sorted(set(expected) - set(state) - {NOISE_EMBED})
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, config {expected[k]}"
        for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]
    )
    wrong_kernel = sorted(
        k for k, kernel in layout.kernels.items()
        if k in state and tuple(state[k].shape) == tuple(kernel.shape)
        and not torch.allclose(state[k].float(), kernel.float(), rtol=0, atol=1e-6)
    )
    if missing or unexpected or wrong_shape or wrong_kernel:
        lines = [f"{source} does not match the original ImageDenoiserModelV1 of its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                             ("resampling kernel is not the fixed [1, 3, 3, 1]/8 filter", wrong_kernel)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise WeightsMismatchError("\n".join(lines))

    own = unet.state_dict()
    ours: Dict[str, torch.Tensor] = {}
    for row in layout.rows:
        for key, part in zip(row.ours, state[row.original].chunk(len(row.ours), dim=0)):
            ours[key] = part.reshape(own[key].shape)
    return ours, state.get(NOISE_EMBED)


def load_original_unet(
    checkpoint_path: PathLike, config_path: Optional[PathLike] = None, *, dtype: Optional[torch.dtype] = None
) -> Tuple[KUNet, Optional[torch.Tensor]]:
    """Our K-UNet with the weights of an original k-diffusion checkpoint, in eval mode.

    ``config_path``: the k-diffusion JSON config; None means the released model's
    (:data:`ORIGINAL_CONFIG`). ``dtype``: of the UNet, float32 by default. Also returns the
    wrapper's ``low_res_noise_embed.weight`` ((64, 1) Fourier frequencies of the noise-augmentation
    level, as stored), or None if the checkpoint lacks it.
    """
    config = OriginalModelConfig.from_json_file(ORIGINAL_CONFIG if config_path is None else config_path)
    state = read_checkpoint(checkpoint_path)
    with no_weight_init():
        unet = KUNet(config.to_unet_config())
    weights, noise_embed = convert_original_state_dict(state, config, unet, source=os.fspath(checkpoint_path))
    unet.load_weights(weights, source=os.fspath(checkpoint_path))
    if dtype is not None:
        unet.to(dtype)
    return unet.eval(), noise_embed
