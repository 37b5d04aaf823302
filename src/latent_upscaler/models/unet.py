"""The K-UNet of the SD x2 latent upscaler: diffusers' ``UNet2DConditionModel`` with K blocks.

Katherine Crowson's k-diffusion upscaler UNet: a noise-level (Fourier) embedding that modulates
every GroupNorm, resnets, attention without feed-forward, and binomial-filter resamplers. The
denoiser preconditioning around it lives in ``denoiser.py``.

Topology (hub config, 4 levels)::

    conv_in → down0 (resnets) → down1..2 (resnet + cross-attn) → down3 (resnet + self & cross-attn)
            → up0 (self & cross-attn, no skip) → up1..2 (cross-attn) → up3 (resnets) → conv_out

Each up block concatenates the *last* output of the down block at its resolution, before that
block's downsampler; the deepest cross-attention down block hands none on (its partner is the
"first" up block, which has self-attention instead). diffusers derives these roles from channel
coincidences inside its block classes; :func:`plan_blocks` writes them out.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..configuration import ConfigError, ModelConfig
from .base import ModelBase
from .layers import (
    ACTIVATIONS,
    GROUP_SIZE,
    AttentionBlock,
    FourierFeatures,
    KDownsample,
    KUpsample,
    ResnetBlock,
    TextContext,
    TimestepEmbedding,
    activation,
    attention_bias,
    attention_layers,
    check_xformers,
    freeu,
)
from .ops import Conv2d

DOWN_BLOCK_TYPES = ("KDownBlock2D", "KCrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("KUpBlock2D", "KCrossAttnUpBlock2D")


@dataclasses.dataclass
class UNetConfig(ModelConfig):
    """The fields of diffusers' ``unet/config.json`` that shape the K-UNet; defaults are the hub's."""

    CLASS_NAME: ClassVar[str] = "UNet2DConditionModel"

    # noisy latents (4) and the conditioning low-res latents (4), concatenated; hub 8
    in_channels: int = 8
    # denoised latents (4) and the original model's log-variance (unused); hub 5
    out_channels: int = 5
    # channels at each resolution, shallowest first; hub [384, 384, 768, 768]
    block_out_channels: List[int] = dataclasses.field(default_factory=lambda: [384, 384, 768, 768])
    # resnets per block, an int or one per down block (up blocks use the reversed list); hub 4
    layers_per_block: Union[int, List[int]] = 4
    # per level, shallowest first: KDownBlock2D (resnets) or KCrossAttnDownBlock2D (+ attention)
    down_block_types: List[str] = dataclasses.field(
        default_factory=lambda: ["KDownBlock2D"] + ["KCrossAttnDownBlock2D"] * 3
    )
    # per level, deepest first: KCrossAttnUpBlock2D or KUpBlock2D
    up_block_types: List[str] = dataclasses.field(
        default_factory=lambda: ["KCrossAttnUpBlock2D"] * 3 + ["KUpBlock2D"]
    )
    # channels per attention head (K blocks read it as a head *size*: heads = width // it), an int or
    # one per block; up block i uses entry i, not the reversed list (as diffusers does); hub 64
    attention_head_dim: Union[int, List[int]] = 64
    # width of the text encoder states attended to (CLIP ViT-L/14); one value, or a list of equal ones
    cross_attention_dim: Union[int, List[int]] = 768
    # noise-level features: only "fourier" (Gaussian random features of c_noise) exists for K blocks
    time_embedding_type: str = "fourier"
    # Fourier features ordered [cos, sin] (True) or [sin, cos]; hub True
    flip_sin_to_cos: bool = True
    # activation of the resnets and of the time-embedding MLP (exact GELU); hub "gelu"
    act_fn: str = "gelu"
    # activation after the time-embedding MLP, or None; hub "gelu" ("timestep_act_2" before 12f0a89)
    timestep_post_act: Optional[str] = "gelu"
    # width of the extra condition added to the Fourier features: 128 noise-augmentation features
    # then the 768 pooled CLIP embedding; hub 896
    time_cond_proj_dim: Optional[int] = 896
    # kernel sizes of the input and output convolutions (odd; "same" padding); hub 1 and 1
    conv_in_kernel: int = 1
    conv_out_kernel: int = 1
    # GroupNorm + act_fn before conv_out with this many groups, or None for none; hub None
    norm_num_groups: Optional[int] = None
    # epsilon of the resnet norms and of that output norm (attention norms keep 1e-5); hub 1e-5
    norm_eps: float = 1e-5
    # map the input from [0, 1] to [-1, 1] (2x - 1) before conv_in; hub False
    center_input_sample: bool = False

    #: diffusers fields accepted only at the value that adds no module and changes no output
    NEUTRAL: ClassVar[Dict[str, Any]] = {
        "mid_block_type": None,  # K-UNets have no mid block
        "dropout": 0.0,  # training only; the model has no dropout layers
        "time_embedding_dim": None,  # emb width = 2 * block_out_channels[0]
        "time_embedding_act_fn": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "num_attention_heads": None,  # diffusers itself refuses other values
        "class_embed_type": None,
        "num_class_embeds": None,
        "addition_embed_type": None,
        "class_embeddings_concat": False,  # would double the block embedding width
        "attention_type": "default",  # "gated" adds GLIGEN's position_net
    }
    #: diffusers fields that K blocks never read (get_down_block/get_up_block do not pass them on,
    #: or they belong to a mid block or to embeddings that are off)
    IGNORED: ClassVar[Tuple[str, ...]] = (
        "sample_size",
        "freq_shift",
        "downsample_padding",
        "mid_block_scale_factor",
        "mid_block_only_cross_attention",
        "only_cross_attention",
        "dual_cross_attention",
        "use_linear_projection",
        "upcast_attention",
        "transformer_layers_per_block",
        "reverse_transformer_layers_per_block",
        "resnet_time_scale_shift",
        "resnet_skip_time_act",
        "resnet_out_scale_factor",
        "cross_attention_norm",
        "projection_class_embeddings_input_dim",
        "addition_time_embed_dim",
        "addition_embed_type_num_heads",
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "UNetConfig":
        raw = dict(raw)
        if "timestep_act_2" in raw:
            legacy = raw.pop("timestep_act_2")
            current = raw.get("timestep_post_act")
            if current is not None and current != legacy:
                raise ConfigError(
                    f"{source}: field 'timestep_act_2' = {legacy!r} contradicts 'timestep_post_act' = {current!r}"
                )
            warnings.warn(
                f"{source}: field 'timestep_act_2' is the spelling of hub revisions before 12f0a89; reading it "
                f"as timestep_post_act = {legacy!r}, as the original model computes (current diffusers ignores "
                "it and drops the activation)",
                UserWarning,
                stacklevel=2,
            )
            raw["timestep_post_act"] = legacy
        return super().from_dict(raw, source=source)

    @property
    def time_embed_dim(self) -> int:
        """Width of ``emb``: twice the number of Fourier frequencies, ``2 * block_out_channels[0]``."""
        return 2 * self.block_out_channels[0]

    @property
    def context_dim(self) -> int:
        """Width of the text encoder states every cross-attention reads."""
        return _per_block(self.cross_attention_dim, 1)[0]

    def validate(self, source: str = "config") -> None:
        def fail(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field {field!r} = {getattr(self, field)!r} {why}")

        n = len(self.block_out_channels) if isinstance(self.block_out_channels, (list, tuple)) else 0
        if n == 0 or not all(_is_positive_int(c) for c in self.block_out_channels):
            raise fail("block_out_channels", "must be a non-empty list of positive integers")
        for field, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, field)
            if not isinstance(types, (list, tuple)) or len(types) != n:
                raise fail(field, f"must list one block per entry of block_out_channels ({n})")
            for t in types:
                if t not in known:
                    raise fail(field, f"has {t!r}; this K-UNet builds only {' and '.join(known)}")
        for field in ("layers_per_block", "attention_head_dim", "cross_attention_dim"):
            value = getattr(self, field)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if not values or not all(_is_positive_int(v) for v in values):
                raise fail(field, "must be a positive integer or a list of them")
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise fail(field, f"must have one entry per block ({n})")
        if len(set(_per_block(self.cross_attention_dim, n))) > 1:
            raise fail("cross_attention_dim", "differs between blocks; all blocks attend to the same text states")
        for field in ("in_channels", "out_channels"):
            if not _is_positive_int(getattr(self, field)):
                raise fail(field, "must be a positive integer")
        if self.time_embedding_type != "fourier":
            raise fail("time_embedding_type", "is not supported; the K-UNet embeds noise levels with 'fourier'")
        if not isinstance(self.act_fn, str) or self.act_fn.lower() not in ACTIVATIONS:
            raise fail("act_fn", f"is not one of {sorted(ACTIVATIONS)}")
        post = self.timestep_post_act
        if post is not None and (not isinstance(post, str) or post.lower() not in ACTIVATIONS):
            raise fail("timestep_post_act", f"is neither None nor one of {sorted(ACTIVATIONS)}")
        if self.time_cond_proj_dim is not None and not _is_positive_int(self.time_cond_proj_dim):
            raise fail("time_cond_proj_dim", "must be None or a positive integer")
        for field in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, field)
            if not _is_positive_int(k) or k % 2 == 0:
                raise fail(field, "must be a positive odd integer (the convolution keeps the image size)")
        groups, width = self.norm_num_groups, self.block_out_channels[0]
        if groups is not None and (not _is_positive_int(groups) or width % groups):
            raise fail("norm_num_groups", f"must be None or divide block_out_channels[0] = {width}")
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise fail("norm_eps", "must be a positive number")

        down, up = plan_blocks(self)
        for blocks in (down, up):
            for block in blocks:
                for res, attn in block.layers:
                    for channels, g in ((res.in_channels, res.groups_in), (res.mid_channels, res.groups_mid)):
                        if g < 1 or channels % g:
                            raise fail(
                                "block_out_channels",
                                f"gives a resnet norm over {channels} channels in {g} groups (channels // "
                                f"{GROUP_SIZE} of its block); widths must be at least {GROUP_SIZE} and divisible",
                            )
                    if attn is not None and attn.dim < attn.head_dim:
                        raise fail("attention_head_dim", f"exceeds an attention width of {attn.dim} (no head left)")
                    if attn is not None and attn.dim % max(1, attn.dim // GROUP_SIZE):
                        raise fail("block_out_channels", f"gives an attention norm over {attn.dim} channels that "
                                   "does not split into groups of about 32")
        for i, (up_block, down_block) in enumerate(zip(up, reversed(down))):
            if up_block.skip != down_block.skip:
                has = "hands on a skip" if down_block.skip else "hands on no skip"
                raise fail(
                    "up_block_types",
                    f"pairs up block {i} ({up_block.type}, which {'needs' if up_block.skip else 'takes no'} skip) "
                    f"with down block {n - 1 - i} ({down_block.type}, which {has}); diffusers would fail at the "
                    "first forward",
                )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _per_block(value: Union[int, Sequence[int]], n: int) -> List[int]:
    return [value] * n if isinstance(value, int) else list(value)


# ------------------------------------------------------------------------------------------------
# Topology


@dataclasses.dataclass(frozen=True)
class ResnetPlan:
    in_channels: int
    mid_channels: int  # conv1 output, norm2 width
    out_channels: int  # conv2 output
    groups_in: int
    groups_mid: int


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    dim: int
    head_dim: int
    self_attention: bool


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    type: str
    layers: Tuple[Tuple[ResnetPlan, Optional[AttentionPlan]], ...]
    resample: bool  # down blocks: KDownsample after the layers; up blocks: KUpsample
    # down blocks: hands its last layer output to the up block at its level;
    # up blocks: concatenates that skip to its input (channels first: [h, skip])
    skip: bool


def plan_blocks(config: UNetConfig) -> Tuple[List[BlockPlan], List[BlockPlan]]:
    """The down blocks (shallowest first) and up blocks (deepest first) that diffusers builds.

    Written out from ``UNet2DConditionModel.__init__`` and the K block classes: resnet norm groups
    are ``channels // 32`` (norm2 of up blocks: the block width // 32), the deepest down block has
    self-attention and (if cross-attention) no skip, and a ``KCrossAttnUpBlock2D`` is diffusers'
    "first block" (self-attention, no skip) iff its width, the next level's width and the embedding
    width coincide, and a "middle block" (its last conv2 narrows to the next level) iff the widths
    differ. Up blocks use the reversed ``layers_per_block`` but ``attention_head_dim[i]`` unreversed.
    """
    widths = list(config.block_out_channels)
    n = len(widths)
    layers = _per_block(config.layers_per_block, n)
    head_dims = _per_block(config.attention_head_dim, n)
    g = GROUP_SIZE

    down = []
    for i, kind in enumerate(config.down_block_types):
        deepest = i == n - 1
        cross = kind == "KCrossAttnDownBlock2D"
        c_in, width = widths[max(i - 1, 0)], widths[i]
        block_layers = []
        for j in range(layers[i]):
            c = c_in if j == 0 else width
            attn = AttentionPlan(width, head_dims[i], self_attention=deepest) if cross else None
            block_layers.append((ResnetPlan(c, width, width, c // g, width // g), attn))
        down.append(BlockPlan(kind, tuple(block_layers), resample=not deepest, skip=not (cross and deepest)))

    up = []
    for i, kind in enumerate(config.up_block_types):
        level = n - 1 - i
        width = widths[level]  # the input (and skip) width at this level
        out = widths[max(level - 1, 0)]  # the width of the next, shallower level: the block's output
        if kind == "KCrossAttnUpBlock2D":
            first = width == out == config.time_embed_dim
            skip = not first
        else:
            first, skip = False, True
        block_layers = []
        for j in range(layers[level]):
            c = (2 * width if skip else width) if j == 0 else width
            last = j == layers[level] - 1
            if kind == "KUpBlock2D":
                mid = out if last else width
                res, attn = ResnetPlan(c, mid, mid, c // g, width // g), None
            else:
                res = ResnetPlan(c, width, out if last else width, c // g, width // g)
                attn = AttentionPlan(out if last else width, head_dims[i], self_attention=first)
            block_layers.append((res, attn))
        up.append(BlockPlan(kind, tuple(block_layers), resample=i < n - 1, skip=skip))
    return down, up


# ------------------------------------------------------------------------------------------------
# Blocks


class _Block(nn.Module):
    """Resnets, each followed by an attention block in cross-attention blocks; keys as diffusers'."""

    def __init__(self, plan: BlockPlan, config: UNetConfig):
        super().__init__()
        emb_dim, context_dim = config.time_embed_dim, config.context_dim
        self.resnets = nn.ModuleList(
            ResnetBlock(r.in_channels, r.mid_channels, r.out_channels, emb_dim, r.groups_in, r.groups_mid,
                        config.norm_eps, config.act_fn)
            for r, _ in plan.layers
        )
        if plan.layers[0][1] is None:
            self.attentions = None
        else:
            self.attentions = nn.ModuleList(
                AttentionBlock(a.dim, a.head_dim, context_dim, emb_dim, a.self_attention) for _, a in plan.layers
            )
        self.out_channels = plan.layers[-1][0].out_channels

    def _layers(self, h: Tensor, emb: Tensor, context: Tensor, context_mask: Optional[Tensor]) -> Tensor:
        if self.attentions is None:
            for resnet in self.resnets:
                h = resnet(h, emb)
        else:
            for resnet, attn in zip(self.resnets, self.attentions):
                h = attn(resnet(h, emb), emb, context, context_mask)
        return h


class DownBlock(_Block):
    """``KDownBlock2D`` / ``KCrossAttnDownBlock2D``: layers, then an optional K downsampler."""

    def __init__(self, plan: BlockPlan, config: UNetConfig):
        super().__init__(plan, config)
        self.downsamplers = nn.ModuleList([KDownsample(self.out_channels)]) if plan.resample else None
        self.hands_on_skip = plan.skip

    def forward(
        self, h: Tensor, emb: Tensor, context: Tensor, context_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``h``: (B, C, H, W). Returns the output (halved if downsampling) and the skip for the up
        block at this level (the full-resolution output) or None."""
        h = self._layers(h, emb, context, context_mask)
        skip = h if self.hands_on_skip else None
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
        return h, skip


class UpBlock(_Block):
    """``KUpBlock2D`` / ``KCrossAttnUpBlock2D``: concatenate the skip, layers, optional K upsampler."""

    def __init__(self, plan: BlockPlan, config: UNetConfig):
        super().__init__(plan, config)
        self.upsamplers = nn.ModuleList([KUpsample(self.out_channels)]) if plan.resample else None
        self.takes_skip = plan.skip
        self.freeu: Optional[Tuple[float, float]] = None  # (b, s) of FreeU, see KUNet.enable_freeu

    def forward(
        self, h: Tensor, skip: Optional[Tensor], emb: Tensor, context: Tensor, context_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``h``: (B, C, H, W); ``skip``: the matching down block's (B, C, H, W) output, or None for
        the first up block. Returns (B, C_next, 2H, 2W) (or H, W for the last block)."""
        assert (skip is not None) == self.takes_skip, "down/up skip roles disagree"
        if skip is not None:
            if self.freeu is not None:
                h, skip = freeu(h, skip, *self.freeu)
            h = torch.cat([h, skip], dim=1)
        h = self._layers(h, emb, context, context_mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


# ------------------------------------------------------------------------------------------------
# The model


class KUNet(ModelBase):
    """The latent upscaler's UNet; state-dict keys and outputs equal diffusers' ``UNet2DConditionModel``."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        config.validate()  # also for configs built in Python rather than read with from_dict
        super().__init__(config)
        widths = config.block_out_channels
        emb_dim = config.time_embed_dim
        self.conv_in = Conv2d(config.in_channels, widths[0], config.conv_in_kernel,
                              padding=(config.conv_in_kernel - 1) // 2)
        self.time_proj = FourierFeatures(emb_dim // 2, config.flip_sin_to_cos)
        self.time_embedding = TimestepEmbedding(emb_dim, emb_dim, config.act_fn, config.timestep_post_act,
                                                config.time_cond_proj_dim)
        down, up = plan_blocks(config)
        self.down_blocks = nn.ModuleList(DownBlock(p, config) for p in down)
        self.up_blocks = nn.ModuleList(UpBlock(p, config) for p in up)
        if config.norm_num_groups is None:
            self.conv_norm_out = self.conv_act = None
        else:
            self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[0], eps=config.norm_eps)
            self.conv_act = activation(config.act_fn)
        self.conv_out = Conv2d(widths[0], config.out_channels, config.conv_out_kernel,
                               padding=(config.conv_out_kernel - 1) // 2)
        # n - 1 halvings, and the deepest upsampler reflect-pads, so it needs at least 2 pixels
        self._size_multiple = 2 ** (len(widths) - 1)
        self._min_size = 2 * self._size_multiple if len(widths) > 1 else 1

    def text_context(self, encoder_hidden_states: torch.Tensor) -> TextContext:
        """A holder for every cross-attention layer's keys and values of the (B, T, cross_attention_dim)
        text encoder states, filled by the first forward: pass it as ``encoder_hidden_states`` to
        evaluate the UNet many times on the same text without recomputing them (same outputs)."""
        return TextContext(encoder_hidden_states)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        encoder_hidden_states: Union[torch.Tensor, TextContext],
        timestep_cond: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One UNet evaluation; returns the raw ``conv_out`` output (B, out_channels, H, W).

        ``sample``: (B, in_channels, H, W), the preconditioned input (``c_in``-scaled noisy latents
        and the conditioning latents), H and W multiples of 8 and at least 16 for the hub config.
        ``timestep``: 0-d or (B,) tensor ``c_noise = ln(sigma) / 4``; its Fourier features are
        computed in its own dtype (float32 in the pipeline) and cast to ``sample.dtype``.
        ``encoder_hidden_states``: (B, T, cross_attention_dim) text encoder states, or their
        :meth:`text_context`.
        ``timestep_cond``: (B, time_cond_proj_dim), added to the features through ``cond_proj``.
        ``encoder_attention_mask``: (B, T) bool (True = attend) or additive float bias over the
        text tokens; None (diffusers' behaviour) attends to all of them.
        """
        self._check_sample(sample)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(self._noise_features(timestep, sample), timestep_cond)
        mask = None if encoder_attention_mask is None else attention_bias(encoder_attention_mask, sample.dtype)
        context = encoder_hidden_states
        if not isinstance(context, TextContext):  # keys and values for this evaluation only
            context = self.text_context(context)

        h = self.conv_in(sample)
        skips = []
        for block in self.down_blocks:
            h, skip = block(h, emb, context, mask)
            skips.append(skip)
        for block, skip in zip(self.up_blocks, reversed(skips)):
            h = block(h, skip, emb, context, mask)
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)

    # ---- switches (diffusers' names) ----

    def set_attention_slice(self, slice_size: Union[str, int, None] = "auto") -> None:
        """Compute every attention ``slice_size`` heads at a time: "auto" halves each layer's heads,
        "max" takes one head at a time, an int at most the fewest heads of any layer (6 for the hub
        model), None turns slicing off. The result is the same up to rounding."""
        layers = attention_layers(self)
        if slice_size is None or slice_size == "max":
            sizes = [None if slice_size is None else 1] * len(layers)
        elif slice_size == "auto":
            sizes = [max(1, layer.heads // 2) for _, layer in layers]
        elif isinstance(slice_size, int) and not isinstance(slice_size, bool) and slice_size >= 1:
            name, fewest = min(layers, key=lambda item: item[1].heads, default=(None, None))
            if fewest is not None and slice_size > fewest.heads:
                raise ValueError(
                    f"slice_size {slice_size} is more than the {fewest.heads} heads of {name}; this UNet takes "
                    f"slice sizes from 1 to {fewest.heads}, 'auto' or 'max'"
                )
            sizes = [slice_size] * len(layers)
        else:
            raise ValueError(f"slice_size must be 'auto', 'max', a positive integer or None, got {slice_size!r}")
        for (_, layer), size in zip(layers, sizes):
            layer.set_attention_slice(size)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """Route every attention through xformers (needs xformers and a CUDA GPU) or back to SDPA."""
        if valid:
            check_xformers(attention_op)
        for _, layer in attention_layers(self):
            layer.set_use_memory_efficient_attention_xformers(valid, attention_op)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023, arXiv:2309.11497) in the two up blocks that concatenate the skips of
        the two coarsest skip-giving levels (hub model: ``up_blocks.1`` with b1/s1, ``up_blocks.2`` with
        b2/s2; ``up_blocks.0`` takes no skip): before the concatenation the first half of the backbone
        channels is multiplied by b and the skip's lowest frequencies by s. diffusers stores these
        values on K blocks but never reads them; here they apply."""
        for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"FreeU factor {name} must be a number, got {value!r}")
        stages = [block for block in self.up_blocks if block.takes_skip][:2]
        for block, (s, b) in zip(stages, ((s1, b1), (s2, b2))):
            block.freeu = (b, s)

    def disable_freeu(self) -> None:
        """Turn FreeU off; outputs are again exactly those without it."""
        for block in self.up_blocks:
            block.freeu = None

    def _noise_features(self, timestep: Union[torch.Tensor, float], sample: torch.Tensor) -> torch.Tensor:
        # as diffusers' get_time_embed: a Python number becomes a float64 (int64) tensor, except on
        # MPS, which lacks 64-bit types; 0-d tensors are broadcast to the batch
        if not torch.is_tensor(timestep):
            wide = sample.device.type != "mps"
            if isinstance(timestep, float):
                dtype = torch.float64 if wide else torch.float32
            else:
                dtype = torch.int64 if wide else torch.int32
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None]
        timestep = timestep.to(sample.device).expand(sample.shape[0])
        return self.time_proj(timestep).to(sample.dtype)

    def _check_sample(self, sample: torch.Tensor) -> None:
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}; expected (batch, {self.config.in_channels}, height, "
                "width): noisy latents and low-res latents concatenated on channels"
            )
        h, w = sample.shape[-2:]
        m, lo = self._size_multiple, self._min_size
        if h % m or w % m or h < lo or w < lo:
            raise ValueError(
                f"sample is {h}×{w}; the K-UNet needs height and width that are multiples of {m} and at "
                f"least {lo} (latents that are multiples of {max(m // 2, 1)}, at least {max(lo // 2, 1)}; "
                "pad the input first)"
            )
