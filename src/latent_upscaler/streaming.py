"""The VAE decoder on large images in little memory, exactly: row bands and whole-image statistics.

A decoder is mostly 3×3 convolutions, which see one row above and below, and GroupNorm layers, which
see the whole image through one mean and variance per group. So :func:`streamed_decode` runs the
layers after the mid-block one residual block at a time (a *segment*: an upsampler, if one comes
first, and a resnet), each over horizontal bands of rows with the few rows of context its
convolutions reach, and gives every GroupNorm the statistics of its whole input, accumulated band by
band in an extra pass over the bands before the rows that need them are made. Every output row is
computed from exactly the rows the one-pass decoder uses, so the result is the one-pass decoder's
(up to float rounding), with no tiles, seams or blending.

Activations between segments live in :class:`Rows`: chunks of rows that are dropped as soon as no later
band reads them, so a segment's input shrinks while its output grows. The decode then holds about one
activation of the full output resolution at a time (the last up block's: ``vae.block_out_channels[0]``
channels), where the one-pass decoder holds about seven, plus bands. A segment's intermediate (the
upsampled input, the resnet's inner activation) is kept when that fits within the same bound and
computed again, band by band, in the pass that needs it otherwise. Upsamplers run at their input's
resolution as four 2×2 convolutions, one per output phase (:func:`upsample_rows`), and bands run
channels-last, which the CPU convolves faster than the NCHW the one-pass decoder uses: together that
pays for the recomputation (bench/streaming.py: the one-pass decode's time at 512–1024 px).

The mid-block (self-attention over every latent position) and ``conv_in`` run on the whole latent.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .models.ops import return_freed_memory, runs_channels_last
from .tiling import merge_moments, whole_mid_block

#: bands are about this many bytes of the widest activation a segment makes (at least MIN_BAND rows):
#: smaller bands recompute more context rows, larger ones hold more memory
BAND_BYTES = 16 * 1024**2
MIN_BAND = 16
#: AutoencoderKL.decode streams outputs of at least this many pixels (smaller ones take as long either way)
STREAM_MIN_PIXELS = 512 * 512
#: a segment keeps an intermediate whole when what it then holds stays within this factor of the
#: bound (the largest activation the decode must hold anyway)
KEEP_SLACK = 1.05

RowFn = Callable[[int, int], torch.Tensor]  # rows [a, b) of an activation, zero outside the image


class Rows:
    """A (B, C, H, W) activation kept as channels-last chunks of ``chunk`` rows; chunks can be dropped
    from the top (:meth:`drop_before`) once no later band reads them."""

    def __init__(self, batch: int, channels: int, height: int, width: int, chunk: int, like: torch.Tensor):
        self.shape = (batch, channels, height, width)
        self.chunk = max(1, chunk)
        self.dtype, self.device = like.dtype, like.device
        self.chunks: List[Optional[torch.Tensor]] = [None] * -(-height // self.chunk)

    @classmethod
    def of(cls, x: torch.Tensor, chunk: int) -> "Rows":
        rows = cls(*x.shape, chunk=chunk, like=x)
        for i in range(len(rows.chunks)):
            rows.put(i, x[:, :, i * rows.chunk:(i + 1) * rows.chunk])
        return rows

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)

    def bands(self) -> List[Tuple[int, int]]:
        return [(i * self.chunk, min((i + 1) * self.chunk, self.height)) for i in range(len(self.chunks))]

    def put(self, index: int, values: torch.Tensor) -> None:
        """Keep ``values`` as chunk ``index``, in memory of its own (a view would keep what it views
        alive until every chunk is dropped)."""
        values = values.contiguous(memory_format=torch.channels_last)
        if values.untyped_storage().nbytes() > values.numel() * values.element_size():
            values = values.clone(memory_format=torch.channels_last)
        self.chunks[index] = values

    def get(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b), zeros for rows outside [0, H) (the convolutions' padding)."""
        lo, hi = max(a, 0), min(b, self.height)
        parts = []
        for i in range(lo // self.chunk, -(-hi // self.chunk)):
            chunk = self.chunks[i]
            if chunk is None:
                raise RuntimeError(f"rows {a}..{b} read after they were dropped")
            start = i * self.chunk
            parts.append(chunk[:, :, max(lo - start, 0):hi - start])
        return _pad_rows(parts, a, b, lo, hi, self.shape, self.dtype, self.device)

    def get_affine(self, a: int, b: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``rows[a:b] * scale + shift`` for rows inside the image, in a fresh tensor (no copy first)."""
        batch, channels, _, width = self.shape
        out = torch.empty(batch, channels, b - a, width, dtype=self.dtype, device=self.device,
                          memory_format=torch.channels_last)
        for i in range(a // self.chunk, -(-b // self.chunk)):
            chunk = self.chunks[i]
            if chunk is None:
                raise RuntimeError(f"rows {a}..{b} read after they were dropped")
            start = i * self.chunk
            lo, hi = max(a, start), min(b, start + chunk.shape[2])
            # in float32 (scale and shift are), one rounding to the activation's dtype
            torch.addcmul(shift, chunk[:, :, lo - start:hi - start], scale, out=out[:, :, lo - a:hi - a])
        return out

    def drop_before(self, row: int) -> None:
        """Free every chunk that lies wholly above ``row``, and hand the memory back to the system:
        chunks and bands of other sizes would otherwise leave holes in the C heap that count in the
        resident set (at 1024 px, 0.1 GiB of the decode's peak, for 8 % of its time)."""
        dropped = False
        for i in range(min(row // self.chunk, len(self.chunks))):
            dropped = dropped or self.chunks[i] is not None
            self.chunks[i] = None
        if dropped:
            return_freed_memory()


def _nbytes(shape, dtype) -> int:
    b, c, h, w = shape
    return b * c * h * w * torch.empty((), dtype=dtype).element_size()


def _pad_rows(parts, a, b, lo, hi, shape, dtype, device) -> torch.Tensor:
    batch, channels, _, width = shape
    before, after = lo - a, b - hi
    if before > 0 or after > 0 or not parts:
        def zeros(n):
            return torch.zeros(batch, channels, n, width, dtype=dtype, device=device).contiguous(
                memory_format=torch.channels_last)
        parts = ([zeros(before)] if before > 0 else []) + list(parts) + ([zeros(after)] if after > 0 else [])
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# Row functions: rows [a, b) of a layer's output from rows of its input


def _valid(fn: Callable[[int, int], torch.Tensor], height: int, shape_of: Tuple[int, int, int],
           like: torch.Tensor) -> RowFn:
    """``fn`` on the rows inside the image, zeros outside (what the next convolution pads with)."""
    batch, channels, width = shape_of

    def rows(a: int, b: int) -> torch.Tensor:
        lo, hi = max(a, 0), min(b, height)
        parts = [fn(lo, hi)] if hi > lo else []
        return _pad_rows(parts, a, b, lo, hi, (batch, channels, height, width), like.dtype, like.device)

    return rows


def _conv_weight(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's weight in ``x``'s memory layout, converted once and kept (as ops.Conv2d does)."""
    if runs_channels_last(conv.weight) != runs_channels_last(x):
        layout = torch.channels_last if runs_channels_last(x) else torch.contiguous_format
        with torch.no_grad():
            conv.weight.data = conv.weight.data.clone(memory_format=layout)
    return conv.weight


def conv_rows(conv: nn.Conv2d, source: RowFn, height: int, like: torch.Tensor) -> RowFn:
    """Rows of ``conv(x)`` (stride 1, 'same' zero padding) from rows of ``x``."""
    reach = conv.kernel_size[0] // 2
    pad_w = conv.padding[1]
    out_channels = conv.out_channels

    def fn(a: int, b: int) -> torch.Tensor:
        x = source(a - reach, b + reach)
        return F.conv2d(x, _conv_weight(conv, x), conv.bias, padding=(0, pad_w))

    return _valid(fn, height, (like.shape[0], out_channels, like.shape[3]), like)


def upsample_rows(conv: nn.Conv2d, source: RowFn, height: int, like: torch.Tensor) -> RowFn:
    """Rows of the upsampler ``conv(nearest×2(x))`` (output ``height`` rows) from rows of ``x``.

    Computed at the input's resolution: an output pixel (2i + p, 2j + q) sees input rows i − 1, i
    (p = 0) or i, i + 1 (p = 1), so each of the four phases is a 2×2 convolution of ``x`` whose taps
    sum the 3×3 kernel's (:func:`phase_kernels`): 16 instead of 36 multiply-adds per input pixel and
    channel pair, the same sums up to rounding."""
    kernels = phase_kernels(conv.weight.detach())
    bias = conv.bias.detach().repeat_interleave(4) if conv.bias is not None else None
    channels = conv.out_channels

    def fn(a: int, b: int) -> torch.Tensor:
        i0, i1 = a // 2, -(-b // 2)
        x = F.pad(source(i0 - 1, i1 + 1), (1, 1))
        n, w = i1 - i0, x.shape[-1] - 2
        y = F.conv2d(x, _conv_weight_tensor(kernels, x), bias)  # (B, 4C, n + 1, w + 1), channels c·4 + phase
        y = y.view(y.shape[0], channels, 4, n + 1, w + 1)
        out = torch.empty(y.shape[0], channels, 2 * n, 2 * w, dtype=y.dtype, device=y.device,
                          memory_format=torch.channels_last)
        for p in (0, 1):
            for q in (0, 1):
                out[:, :, p::2, q::2] = y[:, :, 2 * p + q, p:p + n, q:q + w]
        return out[:, :, a - 2 * i0:b - 2 * i0]

    return _valid(fn, height, (like.shape[0], channels, like.shape[3]), like)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(4·C_out, C_in, 2, 2) kernels of nearest ×2 upsampling followed by the 3×3 ``weight``, one per
    output phase (p, q) at channel c·4 + 2p + q: taps that fall on the same input pixel summed."""

    def fold(w: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
        first, middle, last = w.narrow(dim, 0, 1), w.narrow(dim, 1, 1), w.narrow(dim, 2, 1)
        return torch.cat([first, middle + last], dim), torch.cat([first + middle, last], dim)

    phases = [k for rows in fold(weight, 2) for k in fold(rows, 3)]
    return torch.stack(phases, 1).reshape(4 * weight.shape[0], weight.shape[1], 2, 2)


def _conv_weight_tensor(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    layout = torch.channels_last if runs_channels_last(x) else torch.contiguous_format
    return weight if weight.is_contiguous(memory_format=layout) else weight.contiguous(memory_format=layout)


def norm_act_rows(norm: nn.GroupNorm, stats: "GroupStats", act: Callable[[torch.Tensor], torch.Tensor],
                  source: Union[RowFn, Rows], height: int, like: torch.Tensor) -> RowFn:
    """Rows of ``act(norm(x))`` with the whole image's statistics, from rows of ``x``: kept
    :class:`Rows` (read once into the result) or a row function (its fresh result normalised in place)."""
    scale, shift = stats.affine(norm)

    def fn(a: int, b: int) -> torch.Tensor:
        if isinstance(source, Rows):
            return act(source.get_affine(a, b, scale, shift))
        x = source(a, b)
        return act(torch.addcmul(shift, x, scale, out=x))  # in float32, one rounding to x's dtype

    return _valid(fn, height, (like.shape[0], norm.num_channels, like.shape[3]), like)


class GroupStats:
    """Per (image, group) mean and variance of an activation, merged band by band in float64 (Chan,
    Golub & LeVeque's pairwise update)."""

    def __init__(self, groups: int, eps: float):
        self.groups, self.eps = groups, eps
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor, disposable: bool = False) -> None:
        """Merge the statistics of the band ``x``; ``disposable``: ``x`` may be overwritten."""
        b, c, h, w = x.shape
        per_group = c // self.groups
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):  # moments of half-precision values in float32
            x, disposable = x.float(), True
        # per channel (fast reductions over the rows of a channels-last band), then per group, in float64
        mean_c = x.sum(dim=(2, 3), dtype=torch.float32) / (h * w)
        mean_x = mean_c.to(x.dtype)[:, :, None, None]
        centred = x.sub_(mean_x) if disposable else x - mean_x
        m2_c = centred.mul_(centred).sum(dim=(2, 3), dtype=torch.float32).double()
        mean_c = mean_c.double().reshape(b, self.groups, per_group)
        mean = mean_c.mean(dim=2)
        m2 = (m2_c.reshape(b, self.groups, per_group).sum(dim=2)
              + ((mean_c - mean[:, :, None]) ** 2).sum(dim=2) * (h * w))
        moments = (h * w * per_group, mean, m2)
        if self.mean is not None:
            moments = merge_moments((self.count, self.mean, self.m2), moments)
        self.count, self.mean, self.m2 = moments

    def affine(self, norm: nn.GroupNorm) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, C, 1, 1): ``norm(x) == x * scale + shift`` with these statistics."""
        assert self.mean is not None, "statistics of an empty image"
        per_group = norm.num_channels // self.groups
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps)
        mean_c = self.mean.repeat_interleave(per_group, dim=1)
        rstd_c = rstd.repeat_interleave(per_group, dim=1)
        weight = norm.weight.double() if norm.weight is not None else torch.ones_like(rstd_c[0])
        bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(rstd_c[0])
        scale = rstd_c * weight
        shift = bias - mean_c * scale
        # float32 whatever the model's dtype: half-precision bands are normalised in float32, as torch's
        # GroupNorm does, and rounded once
        return scale.float()[:, :, None, None], shift.float()[:, :, None, None]


# --------------------------------------------------------------------------------------------------
# Segments


def _band_rows(batch: int, channels: int, width: int, itemsize: int, height: int) -> int:
    rows = BAND_BYTES // max(1, batch * channels * width * itemsize)
    return max(min(MIN_BAND, height), min(height, rows))


def _measure(source: RowFn, height: int, band: int, norm: nn.GroupNorm, stored: bool,
             keep: Optional[Rows] = None, release: Optional[Callable[[int], None]] = None) -> GroupStats:
    """Statistics of ``source`` over the whole image, band by band; ``stored``: ``source`` gives views
    of kept rows; ``keep``: store the bands there; ``release(row)``: called after each band with the
    first row later bands may still read."""
    stats = GroupStats(norm.num_groups, norm.eps)
    for i, a in enumerate(range(0, height, band)):
        b = min(a + band, height)
        part = source(a, b)
        stats.add(part, disposable=not stored and keep is None)
        if keep is not None:
            keep.put(i, part)
        if release is not None:
            release(b)
    return stats


def _materialize(source: RowFn, shape, band: int, like: torch.Tensor,
                 release: Optional[Callable[[int], None]] = None) -> Rows:
    rows = Rows(*shape, chunk=band, like=like)
    for i, (a, b) in enumerate(rows.bands()):
        rows.put(i, source(a, b))
        if release is not None:
            release(b)
    return rows


def resnet_segment(resnet: nn.Module, x: Rows, upsampler: Optional[nn.Module], bound: int,
                   log: Optional[List[Tuple[str, str]]] = None) -> Rows:
    """``resnet(upsampler(x))`` (or ``resnet(x)``) over row bands; ``x`` is consumed (its chunks are
    dropped as the output is made). Holds at most about ``bound`` bytes of whole activations where a
    schedule allows it (recomputing intermediates band by band otherwise). ``log``: gets the
    schedule chosen, (upsampled input: "none", "kept" or "recomputed"; inner activation: "kept",
    "kept with the shortcut" or "recomputed")."""
    batch, in_ch, in_h, width = x.shape
    scale = 2 if upsampler is not None else 1
    height, width = in_h * scale, width * scale
    like = torch.empty(batch, 1, 0, width, dtype=x.dtype, device=x.device)  # batch, width, dtype
    out_ch = resnet.conv1.out_channels
    itemsize = like.element_size()
    band = _band_rows(batch, max(in_ch, out_ch), width, itemsize, height)
    u_shape = (batch, in_ch, height, width)
    h_shape = (batch, out_ch, height, width)

    # the (upsampled) input: kept whole when that fits, else made again in every pass
    u_rows: Optional[Rows] = None
    if upsampler is None:
        u_rows = x
    elif _nbytes(u_shape, x.dtype) <= bound * KEEP_SLACK:
        u_rows = _materialize(upsample_rows(upsampler.conv, x.get, height, like), u_shape, band, like,
                              release=lambda row: x.drop_before(row // 2 - 1))
    u_fn: RowFn = u_rows.get if u_rows is not None else upsample_rows(upsampler.conv, x.get, height, like)
    u_stored = u_rows is not None
    stats1 = _measure(u_fn, height, band, resnet.norm1, u_stored)
    source_bytes = u_rows.nbytes if u_rows is not None else x.nbytes
    act = resnet.nonlinearity_
    h_fn = conv_rows(resnet.conv1, norm_act_rows(resnet.norm1, stats1, act, u_rows if u_stored else u_fn, height,
                                                 like), height, like)

    # the resnet's inner activation: kept when it fits beside the input, else made again for the output
    h_bytes = _nbytes(h_shape, x.dtype)
    h_rows: Optional[Rows] = None
    shortcut_rows: Optional[Rows] = None
    if source_bytes + h_bytes <= bound * KEEP_SLACK:
        h_rows = Rows(*h_shape, chunk=band, like=like)
        stats2 = _measure(h_fn, height, band, resnet.norm2, False, keep=h_rows)
    elif (resnet.conv_shortcut is not None and u_rows is not None
          and max(source_bytes, 2 * h_bytes) <= bound * KEEP_SLACK):
        # keep the inner activation and the shortcut instead of the (wider) input, which goes as they come
        h_rows = Rows(*h_shape, chunk=band, like=like)
        shortcut_rows = Rows(*h_shape, chunk=band, like=like)
        stats2 = GroupStats(resnet.norm2.num_groups, resnet.norm2.eps)
        for i, (a, b) in enumerate(h_rows.bands()):
            part = h_fn(a, b)
            stats2.add(part)
            h_rows.put(i, part)
            shortcut_rows.put(i, resnet.conv_shortcut(u_fn(a, b)))
            _drop(u_rows, x, b - 1, scale)
    else:
        stats2 = _measure(h_fn, height, band, resnet.norm2, False)
    inner: Union[RowFn, Rows] = h_rows if h_rows is not None else h_fn
    residual = conv_rows(resnet.conv2, norm_act_rows(resnet.norm2, stats2, act, inner, height, like), height,
                         like)

    if log is not None:
        log.append(("none" if upsampler is None else "kept" if u_rows is not None else "recomputed",
                    "recomputed" if h_rows is None else "kept" if shortcut_rows is None else "kept with the shortcut"))
    out = Rows(*h_shape, chunk=band, like=like)
    for i, (a, b) in enumerate(out.bands()):
        if shortcut_rows is not None:
            skip = shortcut_rows.get(a, b)
            shortcut_rows.drop_before(b)
        else:
            skip = u_fn(a, b)
            if resnet.conv_shortcut is not None:
                skip = resnet.conv_shortcut(skip)
        part = residual(a, b)
        out.put(i, part.add_(skip) if part.shape == skip.shape else part + skip)
        if h_rows is not None:
            h_rows.drop_before(b - 1)
        _drop(u_rows, x, b - 2, scale)
    return out


def _drop(u_rows: Optional[Rows], x: Rows, row: int, scale: int) -> None:
    """Free the input rows above output row ``row`` (rows later bands read start there or below)."""
    if u_rows is not None:
        u_rows.drop_before(row)
        if u_rows is not x:
            return
    x.drop_before(row // scale - 1)


def head_segment(norm: nn.GroupNorm, act: Callable[[torch.Tensor], torch.Tensor], conv: nn.Conv2d,
                 x: Rows) -> torch.Tensor:
    """``conv(act(norm(x)))`` over row bands, returned whole (NCHW like the one-pass decoder's)."""
    batch, _, height, width = x.shape
    like = torch.empty(batch, 1, 0, width, dtype=x.dtype, device=x.device)
    stats = _measure(x.get, height, x.chunk, norm, True)
    fn = conv_rows(conv, norm_act_rows(norm, stats, act, x, height, like), height, like)
    out = torch.empty(batch, conv.out_channels, height, width, dtype=x.dtype, device=x.device)
    for a, b in x.bands():
        out[:, :, a:b] = fn(a, b)
        x.drop_before(b - 1)
    return out


def hooked(module: nn.Module) -> bool:
    """Whether hooks (torch's, or accelerate's replaced ``forward``) wrap ``module`` or a submodule."""
    return any(m._forward_pre_hooks or m._forward_hooks or hasattr(m, "_hf_hook") for m in module.modules())


def streamed_decode(decoder: nn.Module, z: torch.Tensor, bound: Optional[int] = None,
                    log: Optional[List[Tuple[str, str]]] = None) -> torch.Tensor:
    """Our ``Decoder`` on latents ``z`` (B, C, h, w), after ``post_quant_conv``: the one-pass
    decoder's pixels (B, out_channels, 8h, 8w) up to float rounding, holding about one activation
    of the output resolution at a time (module docstring). ``bound``: bytes of whole activations a
    segment may hold to avoid recomputing (default: one activation of the last up block at the
    output resolution; 0 recomputes every intermediate). ``log``: see :func:`resnet_segment`."""
    h = whole_mid_block(decoder.mid_block, decoder.conv_in(z))
    blocks = decoder.up_blocks
    batch, height, width = z.shape[0], z.shape[-2], z.shape[-1]
    scale_total = 2 ** sum(block.upsamplers is not None for block in blocks)
    final_ch = blocks[-1].resnets[-1].conv2.out_channels
    if bound is None:
        bound = batch * final_ch * height * scale_total * width * scale_total * h.element_size()
    x = Rows.of(h, _band_rows(batch, h.shape[1], width, h.element_size(), height))
    del h
    upsampler = None
    for block in blocks:
        for resnet in block.resnets:
            x = resnet_segment(resnet, x, upsampler, bound, log)
            upsampler = None
        upsampler = block.upsamplers[0] if block.upsamplers is not None else None
    if upsampler is not None:  # an upsampler after the last block (not in SD's VAEs)
        shape = (x.shape[0], x.shape[1], 2 * x.height, 2 * x.shape[3])
        like = torch.empty(batch, 1, 0, shape[3], dtype=x.dtype, device=x.device)
        x = _materialize(upsample_rows(upsampler.conv, x.get, shape[2], like), shape, x.chunk, like)
    out = head_segment(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out, x)
    return out
