"""The layers of the K-UNet: noise-level features, adaptive group norm, resnet, attention (computed by
SDPA, sliced, or by xformers), K resamplers, FreeU.

Attribute names reproduce diffusers' state-dict keys (``norm1.linear``, ``attn2.norm_cross``,
``attn2.to_out.0``, ``conv_shortcut``), so hub checkpoints load strictly. Layouts: images are NCHW;
token sequences are (batch, tokens, width); ``emb`` is the (batch, time_embed_dim) noise-level
embedding that conditions every normalisation.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Conv2d, activation_, add_into

#: the activations diffusers' ``get_activation`` knows (looked up lower-cased, like diffusers)
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}

#: channels per group of every GroupNorm in the K blocks (groups = channels // 32)
GROUP_SIZE = 32


def activation(name: str) -> nn.Module:
    """The activation called ``name`` in a diffusers config (GELU is the exact, erf-based one)."""
    return ACTIVATIONS[name.lower()]()


# ------------------------------------------------------------------------------------------------
# Noise-level embedding


class FourierFeatures(nn.Module):
    """Random Fourier features of the noise level: ``[cos 2πtW, sin 2πtW]`` (``flip_sin_to_cos``).

    ``weight`` holds fixed frequencies W drawn from N(0, 1) at training time; it is stored in the
    checkpoint (``time_proj.weight``) but never trained.
    """

    def __init__(self, num_frequencies: int, flip_sin_to_cos: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_frequencies), requires_grad=False)
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t``: (B,) noise levels ``c_noise = ln(sigma) / 4``, usually float32 (the product is
        computed in the promoted dtype of ``t`` and ``weight``). Returns (B, 2 * num_frequencies)."""
        angles = t[:, None] * self.weight[None, :] * 2 * math.pi
        cos, sin = torch.cos(angles), torch.sin(angles)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """MLP from Fourier features (plus a projected condition vector) to the block embedding ``emb``.

    ``emb = post_act(linear_2(act(linear_1(features + cond_proj(cond)))))``; ``cond_proj`` has no
    bias and exists only when ``cond_dim`` is set.
    """

    def __init__(self, in_dim: int, dim: int, act: str, post_act: Optional[str], cond_dim: Optional[int]):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.cond_proj = None if cond_dim is None else nn.Linear(cond_dim, in_dim, bias=False)
        self.act = activation(act)
        self.linear_2 = nn.Linear(dim, dim)
        self.post_act = None if post_act is None else activation(post_act)

    def forward(self, features: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``features``: (B, in_dim) Fourier features; ``cond``: (B, cond_dim) or None (for the
        upscaler: 128 noise-augmentation features then the 768 pooled CLIP text embedding)."""
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond was given but the config has time_cond_proj_dim = None")
            features = features + self.cond_proj(cond)
        emb = self.linear_2(self.act(self.linear_1(features)))
        return emb if self.post_act is None else self.post_act(emb)


# ------------------------------------------------------------------------------------------------
# Normalisation and resnet


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, modulated by the embedding: ``gn(x) * (1 + scale) + shift``.

    ``linear`` maps ``emb`` to ``[scale | shift]`` (first half scale), one pair per channel.
    """

    def __init__(self, emb_dim: int, channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.linear = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x``: (B, channels, H, W); ``emb``: (B, emb_dim). Returns the layout of ``x``."""
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        # in place on the fresh normalised tensor: the same arithmetic, without two temporaries
        return F.group_norm(x, self.groups, eps=self.eps).mul_(1 + scale).add_(shift)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))`` with embedding-modulated norms.

    Channels go ``in_channels`` → (conv1) ``mid_channels`` → (conv2) ``out_channels``; the 1×1
    ``conv_shortcut`` (no bias) exists iff ``in_channels != out_channels``. ``groups_in`` and
    ``groups_mid`` are the group counts of norm1 and norm2 (diffusers derives both from block
    widths, see ``unet.py``). Dropout (0 in every released config) is left out.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        emb_dim: int,
        groups_in: int,
        groups_mid: int,
        eps: float,
        act: str,
    ):
        super().__init__()
        self.norm1 = AdaGroupNorm(emb_dim, in_channels, groups_in, eps)
        self.conv1 = Conv2d(in_channels, mid_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(emb_dim, mid_channels, groups_mid, eps)
        self.conv2 = Conv2d(mid_channels, out_channels, 3, padding=1)
        self.act_ = activation_(act)  # in place: its inputs are fresh norm outputs
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x``: (B, in_channels, H, W); ``emb``: (B, emb_dim). Returns (B, out_channels, H, W)."""
        h = self.conv1(self.act_(self.norm1(x, emb)))
        h = self.conv2(self.act_(self.norm2(h, emb)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return add_into(skip, h, fresh=h)


# ------------------------------------------------------------------------------------------------
# Attention


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An encoder-token mask as the additive bias SDPA takes, shape (B, 1, 1, T) in ``dtype``.

    ``mask``: (B, T), bool (True = attend; False gets -10000, as in diffusers and the original
    k-diffusion model) or an additive float bias used as it is.
    """
    if mask.dtype == torch.bool:
        mask = (1 - mask.to(dtype)) * -10000.0
    return mask.to(dtype)[:, None, None, :]


def xformers_ops():
    """``xformers.ops``, or an error saying how to install it."""
    try:
        import xformers.ops
    except ImportError as e:
        raise ModuleNotFoundError(
            "memory-efficient attention needs xformers, which is not installed: `pip install xformers` (a build "
            "matching your torch and CUDA versions, see https://github.com/facebookresearch/xformers). Without "
            "it, attention already runs through PyTorch's memory-efficient scaled_dot_product_attention.",
            name="xformers",
        ) from e
    return xformers.ops


def check_xformers(attention_op=None) -> None:
    """Raise a clear error unless xformers is installed, a CUDA GPU is present and
    ``memory_efficient_attention`` runs there with ``attention_op``."""
    ops = xformers_ops()
    if not torch.cuda.is_available():
        raise ValueError(
            "xformers' memory-efficient attention runs only on CUDA GPUs, and torch.cuda.is_available() is "
            "False here; leave it off (attention already uses PyTorch's scaled_dot_product_attention)"
        )
    try:
        q = torch.randn(1, 2, 1, 40, device="cuda")
        ops.memory_efficient_attention(q, q, q, op=attention_op)
    except Exception as e:  # noqa: BLE001 - any failure of the trial call means "cannot use it here"
        raise ValueError(f"xformers is installed but memory_efficient_attention(op={attention_op!r}) fails on "
                         f"this GPU: {type(e).__name__}: {e}") from e


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                       attention_op=None) -> torch.Tensor:
    """``softmax(q kᵀ / √d + bias) v`` by ``xformers.ops.memory_efficient_attention``.

    ``q`` (B, heads, L, D), ``k``/``v`` (B, heads, T, D) as SDPA takes them; ``bias`` additive,
    broadcastable to (B, heads, L, T), or None. Returns (B, heads, L, D)."""
    ops = xformers_ops()
    b, h, length, tokens = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if bias is not None:
        # xformers neither broadcasts a bias nor takes one whose rows are not 8-aligned in memory:
        # write it into a wider buffer and hand over a view
        aligned = q.new_empty(b, h, length, -(-tokens // 8) * 8)[..., :tokens]
        bias = aligned.copy_(bias.to(q.dtype).expand(b, h, length, tokens))
    out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_bias=bias, op=attention_op)  # BMHK layout
    return out.transpose(1, 2)


class SwitchableAttention(nn.Module):
    """The core ``softmax(q kᵀ / √d + bias) v`` of an attention layer, computed one of three ways
    (diffusers' attention processors): PyTorch's SDPA over all heads (the default); SDPA over one
    batch item and ``slice_size`` heads at a time (:meth:`set_attention_slice`, less peak memory);
    or xformers' ``memory_efficient_attention`` (:meth:`set_use_memory_efficient_attention_xformers`),
    which takes precedence over slicing while it is on. Subclasses set ``heads``."""

    heads: int

    def __init__(self):
        super().__init__()
        self.slice_size: Optional[int] = None  # heads per slice; None computes all at once
        self.use_xformers = False
        self.xformers_op = None  # xformers' ``op`` argument; None lets xformers choose

    @property
    def sliceable_head_dim(self) -> int:
        """The largest slice size: the number of heads (diffusers' name)."""
        return self.heads

    def set_attention_slice(self, slice_size: Optional[int]) -> None:
        """Compute attention ``slice_size`` heads at a time (1 ≤ slice_size ≤ heads), or all at once (None)."""
        if slice_size is not None and not (
            isinstance(slice_size, int) and not isinstance(slice_size, bool) and 1 <= slice_size <= self.heads
        ):
            raise ValueError(f"slice_size {slice_size!r} must be an integer from 1 to this layer's {self.heads} heads")
        self.slice_size = slice_size

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """Route attention through xformers (``valid``) or back to SDPA; see :func:`check_xformers`."""
        self.use_xformers = bool(valid)
        self.xformers_op = attention_op if valid else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q`` (B, heads, L, D), ``k``/``v`` (B, heads, T, D); ``bias`` additive, broadcastable to
        (B, heads, L, T), or None. Returns (B, heads, L, D)."""
        if self.use_xformers:
            if q.device.type != "cuda":
                raise RuntimeError(
                    f"xformers attention is on but the inputs are on {q.device}; it runs only on CUDA GPUs. Move the "
                    "pipeline to a GPU or call disable_xformers_memory_efficient_attention()"
                )
            return xformers_attention(q, k, v, bias, self.xformers_op)
        if self.slice_size is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for i in range(q.shape[0]):
            for j in range(0, q.shape[1], self.slice_size):
                heads = slice(j, j + self.slice_size)
                mask = None if bias is None else _narrow(_narrow(bias, 0, slice(i, i + 1)), 1, heads)
                out[i : i + 1, heads] = F.scaled_dot_product_attention(
                    q[i : i + 1, heads], k[i : i + 1, heads], v[i : i + 1, heads], attn_mask=mask)
        return out


def _narrow(t: torch.Tensor, dim: int, index: slice) -> torch.Tensor:
    # index a broadcastable dimension: a size-1 dimension is kept whole
    return t if t.shape[dim] == 1 else t[(slice(None),) * dim + (index,)]


class TextContext:
    """The text tokens as the cross-attention layers read them: per layer, the keys and values of its
    ``norm_cross``-ed context, split into heads (B, heads, T, head_dim).

    They depend on the text encoder states only, so an upscale computes them once for all its steps
    (:meth:`KUNet.text_context`) instead of once per step and layer: each layer computes its own at
    its first call (inside the model's forward, where offloading hooks have put its weights in place).
    """

    def __init__(self, states: torch.Tensor):
        self.states = states  # (B, T, context_dim), the encoder states they are computed from
        self._version = states._version
        self._keys_values: Dict[nn.Module, Tuple[torch.Tensor, torch.Tensor]] = {}

    def keys_values(self, layer: "Attention") -> Tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s keys and values of the states, computed at the first request."""
        if layer not in self._keys_values:
            self._keys_values[layer] = layer.keys_values(self.states)
        return self._keys_values[layer]

    def is_for(self, states: torch.Tensor) -> bool:
        """Whether this holds ``states`` as it is now (the same tensor, not modified since)."""
        return states is self.states and states._version == self._version


class Attention(SwitchableAttention):
    """Multi-head attention with biased q/k/v/out projections, ``softmax(q kᵀ / √head_dim) v``.

    Self-attention when ``context_dim`` is None; otherwise cross-attention over context tokens that
    are first normalised by ``norm_cross`` (LayerNorm over ``context_dim``). How the softmax product
    is computed (SDPA, sliced, xformers) is switched by :class:`SwitchableAttention`.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_cross = None if context_dim is None else nn.LayerNorm(context_dim)
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # key ``to_out.0``, as in diffusers

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, L, heads * D) -> (B, heads, L, D), a view
        return t.view(t.shape[0], t.shape[1], self.heads, t.shape[-1] // self.heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, T, head_dim) of ``source``: the (B, T, context_dim) context for
        cross-attention (normalised here), the (B, L, dim) queries' tokens for self-attention."""
        if self.norm_cross is not None:
            source = self.norm_cross(source)
        return self._heads(self.to_k(source)), self._heads(self.to_v(source))

    def forward(
        self,
        x: torch.Tensor,
        context: "Optional[torch.Tensor | TextContext]" = None,
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x``: (B, L, dim) queries; ``context``: (B, T, context_dim) for cross-attention, or a
        :class:`TextContext` that holds this layer's keys and values; ignored for self-attention;
        ``context_mask``: (B, T) bool/additive (see :func:`attention_bias`) or an additive bias
        broadcastable to (B, heads, L, T); None attends to every token. Returns (B, L, dim)."""
        batch = x.shape[0]
        q = self._heads(self.to_q(x))
        if self.norm_cross is None:
            k, v = self.keys_values(x)
        elif isinstance(context, TextContext):
            k, v = context.keys_values(self)
        else:
            k, v = self.keys_values(context)
        if context_mask is not None and (context_mask.dtype == torch.bool or context_mask.ndim == 2):
            context_mask = attention_bias(context_mask, q.dtype)
        out = self.attend(q, k, v, context_mask)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3])
        return self.to_out[0](out)


def attention_layers(model: nn.Module):
    """``(name, layer)`` for every :class:`SwitchableAttention` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SwitchableAttention)]


class AttentionBlock(nn.Module):
    """diffusers' ``KAttentionBlock``: optional self-attention, then cross-attention; no feed-forward.

    Each attention reads an ``AdaGroupNorm``-ed copy of the image as tokens and adds its output back
    (residual). ``norm1``/``attn1`` exist only with ``self_attention``.
    """

    def __init__(self, dim: int, head_dim: int, context_dim: int, emb_dim: int, self_attention: bool):
        super().__init__()
        heads = dim // head_dim
        groups = max(1, dim // GROUP_SIZE)
        if self_attention:
            self.norm1 = AdaGroupNorm(emb_dim, dim, groups)
            self.attn1 = Attention(dim, heads, head_dim)
        else:
            self.norm1 = self.attn1 = None
        self.norm2 = AdaGroupNorm(emb_dim, dim, groups)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: "torch.Tensor | TextContext",
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x``: (B, dim, H, W); ``emb``: (B, emb_dim); ``context``: (B, T, context_dim) text
        encoder states or their :class:`TextContext`; ``context_mask``: see :meth:`Attention.forward`.
        Returns the layout of ``x``."""
        # the attention output (a fresh tensor, which _image views channels-last) takes the residual
        if self.attn1 is not None:
            x = add_into(self._image(self.attn1(self._tokens(self.norm1(x, emb))), x), x)
        return add_into(self._image(self.attn2(self._tokens(self.norm2(x, emb)), context, context_mask), x), x)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H*W, C), tokens in row-major pixel order
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    @staticmethod
    def _image(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # (B, H*W, C) -> (B, C, H, W), the inverse of _tokens
        return tokens.permute(0, 2, 1).reshape(like.shape)


# ------------------------------------------------------------------------------------------------
# K resamplers


def _k_kernel(channels: int, gain: float) -> torch.Tensor:
    """The separable 4×4 kernel ``(g·k)(g·k)ᵀ`` with ``k = [1, 3, 3, 1] / 8``, one per channel."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8 * gain
    return torch.outer(k, k).expand(channels, 1, 4, 4).contiguous()


class KDownsample(nn.Module):
    """Halve H and W: reflect-pad 1, then the [1, 3, 3, 1]/8 binomial filter at stride 2, per channel.

    Depthwise (``groups=channels``); the kernel is a constant, not in the state dict.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("kernel", _k_kernel(channels, 1.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, channels, H, W), H, W ≥ 2. Returns (B, channels, ⌊H/2⌋, ⌊W/2⌋)."""
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.kernel, stride=2, groups=x.shape[1])


class KUpsample(nn.Module):
    """Double H and W: reflect-pad 1, then a stride-2 transposed convolution with the filter ×2, per
    channel (depthwise; the kernel is a constant, not in the state dict)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("kernel", _k_kernel(channels, 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, channels, H, W), H, W ≥ 2. Returns (B, channels, 2H, 2W)."""
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv_transpose2d(x, self.kernel, stride=2, padding=3, groups=x.shape[1])


# ------------------------------------------------------------------------------------------------
# FreeU


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the lowest spatial frequencies of ``x`` (B, C, H, W) by ``scale``: the box of half-width
    ``threshold`` around the centre of the shifted 2-D spectrum (FreeU's spectral modulation of skips).
    The FFT runs in float32 (fp16 FFTs are unstable, bf16 ones missing); returns the dtype of ``x``."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    mask[h // 2 - threshold : h // 2 + threshold, w // 2 - threshold : w // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


def freeu(h: torch.Tensor, skip: torch.Tensor, backbone_scale: float, skip_scale: float):
    """FreeU (Si et al. 2023, arXiv:2309.11497) before a decoder block concatenates its skip:
    the first half of the backbone channels of ``h`` times ``backbone_scale`` (b), the skip
    features' low frequencies times ``skip_scale`` (s). Both (B, C, H, W); returns ``(h, skip)``."""
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * backbone_scale, h[:, half:]], dim=1)
    return h, fourier_filter(skip, threshold=1, scale=skip_scale)
