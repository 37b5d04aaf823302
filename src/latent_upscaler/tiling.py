"""Large images in bounded memory: overlapping tiles blended with smooth weights.

Three users of one tile planner (:func:`plan_axis`, :func:`plan_tiles`):

- :class:`TiledDenoiser` evaluates a denoiser D(x; σ, cond) on overlapping latent tiles and
  averages the denoised estimates with smooth weights at every step (MultiDiffusion, Bar-Tal et al.
  2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation", eq. 5): the
  weighted least-squares fusion of the tiles' estimates. It has the denoiser's signature, so every
  sampler works with it; the spatial conditioning (``low_res_cond``) is cut like ``x``.
- :func:`tiled_decode` and :func:`tiled_encode` run the VAE in tiles. The parts of the VAE that see
  the whole image at once run on the whole image, where it is small (the latent resolution): the
  mid-block with its self-attention, the blocks at the latent resolution, the encoder's output
  head. The blocks whose cost and memory grow with the pixel count run in tiles, one up (down)
  block per *stage*, each stage from a blended checkpoint of the previous one. Their GroupNorm
  layers get the exact statistics of the whole image (:class:`WholeImageGroupNorm`), the same for
  every tile, so tiles cannot differ in tone.

Tiles are planned in latent pixels. Each tile owns a *core* (the tiles' cores partition the image)
and ramps up over its overlap with each neighbour; weights are ``sin²`` ramps, so two overlapping
tiles' weights sum to one and the blend has no kink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: the K-UNet's input sides must be multiples of this (it halves the latent three times) …
UNET_MULTIPLE = 8
#: … and at least this large (reflect padding at its coarsest level)
UNET_MINIMUM = 16


# --------------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass(frozen=True)
class Span:
    """One tile along one axis, in latent pixels: it reads ``[start, end)``, owns ``[core_start,
    core_end)`` and ramps its weight up over ``ramp_before`` pixels at its start and down over
    ``ramp_after`` at its end (0 at the image border)."""

    start: int
    end: int
    core_start: int
    core_end: int
    ramp_before: int = 0
    ramp_after: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    def weights(self, scale: int = 1, margin: int = 0) -> torch.Tensor:
        """(size·scale,) float32 blending weights at ``scale`` output pixels per plan pixel.

        Over an overlap of n pixels the weight is 0 for the ``margin`` pixels at the tile's edge
        (where its values miss context beyond the tile), rises as ``sin²`` over the middle and is 1
        for the last ``margin`` pixels, where the neighbour's edge is; the margin shrinks to leave a
        ramp of at least 2 pixels. Neighbours' weights sum to one across the overlap."""
        w = torch.ones(self.size * scale)
        for length, flip in ((self.ramp_before, False), (self.ramp_after, True)):
            if length:
                n = length * scale
                m = min(margin, max(0, (n - 2) // 2))
                core = n - 2 * m
                ramp = torch.ones(n)
                ramp[:m] = 0
                ramp[m:m + core] = torch.sin(0.5 * math.pi * (torch.arange(core) + 0.5) / core) ** 2  # symmetric
                if flip:
                    w[-n:] *= ramp.flip(0)
                else:
                    w[:n] *= ramp
        return w


def plan_axis(size: int, tile: int, overlap: int, multiple: int = 1, minimum: int = 1) -> List[Span]:
    """Tiles of at most ``tile`` pixels covering ``[0, size)`` with at least ``overlap`` pixels shared
    by neighbours, starts at multiples of ``multiple``, spread evenly. One tile when ``tile ≥ size``.

    The fewest tiles that can do it, each shrunk to the smallest length (a multiple of ``multiple``,
    at least ``minimum``) that still covers the axis with them: less work in overlaps than tiles of
    exactly ``tile``, and less memory. ``size``, ``tile`` and ``overlap`` must be multiples of
    ``multiple`` and ``overlap < tile``.
    """
    if tile >= size:
        return [Span(0, size, 0, size)]
    if min(tile, size) <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tile {tile} and overlap {overlap} must satisfy 0 ≤ overlap < tile (size {size})")
    if size % multiple or tile % multiple or overlap % multiple:
        raise ValueError(f"size {size}, tile {tile} and overlap {overlap} must be multiples of {multiple}")
    units, tile_u, overlap_u = size // multiple, tile // multiple, overlap // multiple
    n = 1 + -(-(units - tile_u) // (tile_u - overlap_u))
    least = -(-minimum // multiple)
    tile_u = min(tile_u, max(-(-(units + (n - 1) * overlap_u) // n), least))
    tile = tile_u * multiple
    starts = [(i * (units - tile_u)) // (n - 1) * multiple for i in range(n)]
    ends = [s + tile for s in starts]
    cuts = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(n - 1)] + [size]  # middles of the overlaps
    return [
        Span(starts[i], ends[i], cuts[i], cuts[i + 1],
             ramp_before=ends[i - 1] - starts[i] if i else 0,
             ramp_after=ends[i] - starts[i + 1] if i < n - 1 else 0)
        for i in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class Tile:
    """A rectangle of the plan: rows ``y`` and columns ``x``."""

    y: Span
    x: Span

    def window(self, scale: int = 1) -> Tuple[slice, slice]:
        """Index of the tile in an NCHW tensor at ``scale`` pixels per plan pixel: ``t[(..., *window)]``."""
        return slice(self.y.start * scale, self.y.end * scale), slice(self.x.start * scale, self.x.end * scale)

    def weights(self, scale: int = 1, margin: int = 0) -> torch.Tensor:
        """(size_y·scale, size_x·scale) float32 blending weights (see :meth:`Span.weights`)."""
        return self.y.weights(scale, margin)[:, None] * self.x.weights(scale, margin)[None, :]


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1, minimum: int = 1) -> List[Tile]:
    """Tiles of sides at most ``tile`` over a ``height × width`` grid, row-major (:func:`plan_axis`)."""
    rows = plan_axis(height, tile, overlap, multiple, minimum)
    cols = plan_axis(width, tile, overlap, multiple, minimum)
    return [Tile(y, x) for y in rows for x in cols]


def _weight_sum(tiles: Sequence[Tile], height: int, width: int, scale: int = 1, margin: int = 0) -> torch.Tensor:
    total = torch.zeros(height * scale, width * scale)
    for tile in tiles:
        total[tile.window(scale)] += tile.weights(scale, margin)
    return total


# --------------------------------------------------------------------------------------------------
# The UNet: MultiDiffusion over latent tiles


class TiledDenoiser(nn.Module):
    """``denoiser(x, σ, **cond)`` evaluated on overlapping tiles of ``x``, blended (MultiDiffusion).

    ``x``: noisy latents (B, C, H, W) with H, W multiples of 8. ``cond``: keyword arguments of the
    wrapped denoiser; a tensor whose last two sides equal (H, W) is spatial and is cut like ``x``
    (``low_res_cond``); any other value passes unchanged. Conditioning batches may be a multiple of
    B (classifier-free guidance puts the unconditional copy first); the tiles of one batch keep
    that order. Returns the blended denoised estimate, (B, C, H, W), in the wrapped model's dtype.

    ``tile_size`` and ``overlap``: latent pixels, multiples of 8, ``tile_size ≥ 16``.
    ``tiles_per_batch``: tiles stacked along the batch in one call of the wrapped model (faster on
    GPUs, memory grows with it). Latents no larger than a tile go through in one call, unchanged.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], tile_size: int, overlap: int, tiles_per_batch: int = 1):
        super().__init__()
        if tile_size < UNET_MINIMUM or tile_size % UNET_MULTIPLE or overlap % UNET_MULTIPLE:
            raise ValueError(f"UNet tiles must be multiples of {UNET_MULTIPLE} latent pixels and at least "
                             f"{UNET_MINIMUM} (got tile {tile_size}, overlap {overlap})")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"tile overlap {overlap} must be ≥ 0 and smaller than the tile ({tile_size})")
        if tiles_per_batch < 1:
            raise ValueError(f"tiles_per_batch must be ≥ 1, got {tiles_per_batch}")
        self.denoiser = denoiser
        self.tile_size, self.overlap, self.tiles_per_batch = tile_size, overlap, tiles_per_batch
        self._plans: Dict[Tuple[int, int], Tuple[List[Tile], torch.Tensor]] = {}

    def plan(self, height: int, width: int) -> Tuple[List[Tile], torch.Tensor]:
        """The tiles of a ``height × width`` latent and the sum of their weights (cached)."""
        key = (height, width)
        if key not in self._plans:
            tiles = plan_tiles(height, width, self.tile_size, self.overlap, UNET_MULTIPLE, UNET_MINIMUM)
            self._plans[key] = tiles, _weight_sum(tiles, height, width)
        return self._plans[key]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height <= self.tile_size and width <= self.tile_size:
            return self.denoiser(x, sigma, **cond)
        tiles, weight_sum = self.plan(height, width)
        batch = x.shape[0]
        denoised = None
        for first in range(0, len(tiles), self.tiles_per_batch):
            group = tiles[first:first + self.tiles_per_batch]
            x_tiles = torch.cat([x[(..., *t.window())] for t in group])
            sigma_tiles = sigma.repeat(len(group)) if sigma.ndim else sigma
            cond_tiles = {name: _cut(value, group, batch, (height, width)) for name, value in cond.items()}
            out = self.denoiser(x_tiles, sigma_tiles, **cond_tiles)
            if denoised is None:
                denoised = torch.zeros(x.shape, dtype=out.dtype, device=out.device)
            for tile, part in zip(group, out.split(batch)):
                denoised[(..., *tile.window())] += part * tile.weights().to(part)
        return denoised / weight_sum.to(denoised)


def _cut(value: Any, tiles: Sequence[Tile], batch: int, spatial: Tuple[int, int]) -> Any:
    """The conditioning of ``tiles`` stacked along the batch: copies (B·k) → (k, tiles, B)."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    is_spatial = value.ndim >= 3 and tuple(value.shape[-2:]) == spatial
    if len(tiles) == 1:
        return value[(..., *tiles[0].window())] if is_spatial else value
    if value.shape[0] % batch:
        raise ValueError(f"conditioning of batch {value.shape[0]} is not a multiple of the latents' batch {batch}")
    copies = value.reshape(value.shape[0] // batch, batch, *value.shape[1:])
    parts = [copies[(..., *t.window())] if is_spatial else copies for t in tiles]
    stacked = torch.stack(parts, dim=1)  # (k, tiles, B, ...)
    return stacked.reshape(-1, *stacked.shape[3:])


# --------------------------------------------------------------------------------------------------
# The VAE: stages, and GroupNorm over the whole image


class _Measured(Exception):
    """Raised by the GroupNorm being measured: the rest of the tile's forward is not needed."""


class WholeImageGroupNorm:
    """Exact whole-image statistics for the GroupNorm layers of one stage of a tiled network.

    The statistics of a layer are those of its input over the whole image, and that input depends
    on the statistics of every layer before it. So the stage runs one pass over the tiles per
    GroupNorm, in order: layers already measured normalise with their whole-image statistics, the
    layer being measured adds its input's per-group count, mean and variance over the tile's core
    (the cores partition the image, so every pixel counts once; merged in float64 by Chan et al.'s
    pairwise update) and stops the tile's forward there. A last pass makes the output with every
    layer measured. A stage starts from a checkpoint of the whole image, so a pass costs only the
    stage's layers up to the one measured.
    """

    def __init__(self, norms: Sequence[nn.GroupNorm]):
        self.norms = list(norms)
        self._index = {id(norm): i for i, norm in enumerate(self.norms)}
        self.stats: Dict[int, Tuple[int, torch.Tensor, torch.Tensor]] = {}  # per norm: count, mean, M2
        self.tile: Optional[Tile] = None  # the running tile
        self.measuring: Optional[int] = None  # index of the norm being measured; None: all are

    @contextlib.contextmanager
    def patched(self) -> Iterator["WholeImageGroupNorm"]:
        for norm in self.norms:
            norm.forward = functools.partial(self._forward, norm)
        try:
            yield self
        finally:
            for norm in self.norms:
                del norm.forward

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        i = self._index[id(norm)]
        if i == self.measuring:
            assert self.tile is not None, "set .tile to the running tile before each tile's forward"
            self._merge(i, *_core_statistics(norm, x, self.tile))
            raise _Measured
        assert i in self.stats, "GroupNorm layers ran out of the order given"
        count, mean, m2 = self.stats[i]
        return _normalize(norm, x, mean, m2 / count)

    def _merge(self, i: int, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        moments = (count, mean, var * count)
        self.stats[i] = merge_moments(self.stats[i], moments) if i in self.stats else moments


def merge_moments(first: Tuple[int, torch.Tensor, torch.Tensor],
                  second: Tuple[int, torch.Tensor, torch.Tensor]) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of two disjoint sets of values merged (Chan, Golub & LeVeque 1979): M2 is the
    sum of squared deviations from the mean."""
    n0, mean0, m20 = first
    n1, mean1, m21 = second
    total = n0 + n1
    delta = mean1 - mean0
    return total, mean0 + delta * (n1 / total), m20 + m21 + delta**2 * (n0 * n1 / total)


def _core_statistics(norm: nn.GroupNorm, x: torch.Tensor, tile: Tile) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(elements per group, mean (B, G), variance (B, G)) over the tile's core, float64, without
    gradient."""
    scale_y, scale_x = x.shape[-2] // tile.y.size, x.shape[-1] // tile.x.size
    assert scale_y * tile.y.size == x.shape[-2] and scale_x * tile.x.size == x.shape[-1], "layer not at a plan scale"
    core = x[..., (tile.y.core_start - tile.y.start) * scale_y:(tile.y.core_end - tile.y.start) * scale_y,
             (tile.x.core_start - tile.x.start) * scale_x:(tile.x.core_end - tile.x.start) * scale_x]
    # detached: gradients (a decode outside no_grad) flow through the normalised values, not the statistics
    grouped = core.detach().reshape(core.shape[0], norm.num_groups, -1).float()
    var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
    return grouped.shape[-1], mean.double(), var.double()


def _normalize(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with given per-(image, group) statistics (B, G)."""
    b, c = x.shape[:2]
    per_group = c // norm.num_groups
    mean_c = mean.to(x.dtype).repeat_interleave(per_group, dim=1).reshape(-1)
    var_c = var.to(x.dtype).repeat_interleave(per_group, dim=1).reshape(-1)
    weight = norm.weight.repeat(b) if norm.weight is not None else None
    bias = norm.bias.repeat(b) if norm.bias is not None else None
    # batch_norm with fixed statistics normalises each (image, channel) plane of the reshaped input
    out = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean_c, var_c, weight, bias, False, 0.0, norm.eps)
    return out.reshape(x.shape)


def _group_norms(*modules: nn.Module) -> List[nn.GroupNorm]:
    return [m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)]


#: how a tiled VAE's GroupNorm layers get their statistics (:func:`run_stage`)
GROUP_NORM_MODES = ("global", "sampled", "tile")
#: the "sampled" statistics are measured over about this fraction of the tiles per axis (all of
#: them up to SAMPLED_ALL_UP_TO, else at least 2, at most SAMPLED_MAX_PER_AXIS): measuring a layer
#: reruns the stage up to it on those tiles, so these passes cost about 3.5·(sampled/all)² of the
#: pass that makes the output
SAMPLED_FRACTION = 0.4
SAMPLED_MAX_PER_AXIS = 4
SAMPLED_ALL_UP_TO = 3


def check_group_norm(mode: str) -> None:
    if mode not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm must be one of {', '.join(map(repr, GROUP_NORM_MODES))}, got {mode!r}")


def spread_tiles(tiles: Sequence[Tile]) -> List[Tile]:
    """An evenly spread subset of a row-major grid of tiles: of its n rows (columns), all when
    n ≤ SAMPLED_ALL_UP_TO (small images: exact statistics), else the k = round(SAMPLED_FRACTION · n)
    (between 2 and SAMPLED_MAX_PER_AXIS) at the middles of k equal strips, as in stratified sampling."""
    rows = sorted({t.y for t in tiles}, key=lambda span: span.start)
    cols = sorted({t.x for t in tiles}, key=lambda span: span.start)

    def pick(spans: List[Span]) -> set:
        n = len(spans)
        if n <= SAMPLED_ALL_UP_TO:
            return set(spans)
        k = min(SAMPLED_MAX_PER_AXIS, max(2, round(SAMPLED_FRACTION * n)))
        return {spans[int((i + 0.5) * n / k)] for i in range(k)}

    keep_rows, keep_cols = pick(rows), pick(cols)
    return [t for t in tiles if t.y in keep_rows and t.x in keep_cols]


#: pixels at a VAE stage tile's edges that get no blending weight (where they overlap a neighbour):
#: what one stage's convolutions reach from beyond the tile (a decoder stage runs 7 3×3 convolutions
#: and its output head 1 more; an encoder stage fewer)
STAGE_MARGIN = 8

#: largest magnitude a float16 checkpoint holds safely
_FLOAT16_LIMIT = 6.0e4


def run_stage(body: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor, tiles: Sequence[Tile],
              scale_in: int, norms: Sequence[nn.GroupNorm], group_norm: str = "global",
              dtype: Optional[torch.dtype] = None, store: Optional[torch.dtype] = None) -> torch.Tensor:
    """``body`` over the tiles of ``source`` (``scale_in`` pixels per plan pixel), blended.

    ``norms``: the GroupNorm layers ``body`` runs, in order. ``group_norm`` (see :data:`GROUP_NORM_MODES`):
    "global" gives them whole-image statistics (:class:`WholeImageGroupNorm`, one pass per layer
    over every tile and one more), "sampled" the same statistics measured over the cores of an
    evenly spread subset of the tiles (:func:`spread_tiles`), "tile" each tile's own (one pass). ``dtype``: what ``body`` computes in (``source``'s when None);
    ``store``: the dtype of the blended result (float16 halves a float32 checkpoint; a tile whose
    values float16 cannot hold turns the result to float32). A single tile is the whole image:
    one pass, exact in either mode.
    """
    check_group_norm(group_norm)
    dtype = source.dtype if dtype is None else dtype
    height, width = source.shape[-2] // scale_in, source.shape[-1] // scale_in
    out: Optional[torch.Tensor] = None
    scale = 1

    def run(tile: Tile) -> torch.Tensor:
        return body(source[(..., *tile.window(scale_in))].to(dtype))

    stats = WholeImageGroupNorm(norms) if group_norm != "tile" and len(tiles) > 1 else None
    measured = spread_tiles(tiles) if group_norm == "sampled" else tiles
    with stats.patched() if stats is not None else contextlib.nullcontext():
        for i in range(len(norms) if stats is not None else 0):
            stats.measuring = i
            for tile in measured:
                stats.tile = tile
                try:
                    run(tile)
                except _Measured:
                    continue
                raise AssertionError(f"GroupNorm {i} of the stage did not run")
        if stats is not None:
            stats.measuring = None
        for tile in tiles:
            part = run(tile)
            if out is None:
                scale = part.shape[-2] // tile.y.size
                out = part.new_zeros(*part.shape[:2], height * scale, width * scale, dtype=store or part.dtype)
            if out.dtype == torch.float16 and part.dtype != torch.float16 and part.abs().max() > _FLOAT16_LIMIT:
                out = out.float()
            out[(..., *tile.window(scale))] += (part * tile.weights(scale, STAGE_MARGIN).to(part)).to(out.dtype)
    assert out is not None
    out /= _weight_sum(tiles, height, width, scale, STAGE_MARGIN).to(out)
    return out


def _checkpoint_dtype(dtype: torch.dtype) -> torch.dtype:
    """Checkpoints between stages: float16 for float32 models (half the memory; the rounding is far
    below the tiles' own differences), the model's dtype otherwise."""
    return torch.float16 if dtype == torch.float32 else dtype


def tiled_decode(decoder: nn.Module, z: torch.Tensor, tile_size: int, overlap: int,
                 group_norm: str = "global") -> torch.Tensor:
    """Our ``Decoder`` on latents ``z`` (B, C, h, w) in tiles of ``tile_size`` latent pixels.

    ``z``: unscaled latents after ``post_quant_conv``. conv_in, the mid-block (self-attention over
    all h·w positions) and the first up block's resnets run on the whole latent. Each later up block
    is a stage: its predecessor's upsampler and its own resnets (the last also the output head) run
    per tile from the previous stage's blended checkpoint. Returns pixels (B, out_channels, 8h, 8w)
    like ``decoder(z)``.
    """
    h = whole_mid_block(decoder.mid_block, decoder.conv_in(z))
    blocks = decoder.up_blocks
    for resnet in blocks[0].resnets:
        h = resnet(h)

    def head(x: torch.Tensor) -> torch.Tensor:
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))

    if len(blocks) == 1:
        return head(h)
    tiles = plan_tiles(h.shape[-2], h.shape[-1], tile_size, overlap)
    dtype, scale = h.dtype, 1
    for i in range(1, len(blocks)):
        last = i == len(blocks) - 1

        def body(x: torch.Tensor, upsampler=blocks[i - 1].upsamplers, block=blocks[i], last=last) -> torch.Tensor:
            if upsampler is not None:
                x = upsampler[0](x)
            for resnet in block.resnets:
                x = resnet(x)
            return head(x) if last else x

        norms = _group_norms(blocks[i]) + (_group_norms(decoder.conv_norm_out) if last else [])
        h = run_stage(body, h, tiles, scale, norms, group_norm, dtype, None if last else _checkpoint_dtype(dtype))
        scale = h.shape[-2] // tiles[-1].y.end
    return h


def tiled_encode(encoder: nn.Module, x: torch.Tensor, tile_size: int, overlap: int,
                 group_norm: str = "global") -> torch.Tensor:
    """Our ``Encoder`` on pixels ``x`` (B, C, H, W), H and W multiples of 8, in tiles of
    ``tile_size`` latent pixels (8·tile_size pixels).

    Each down block that halves the resolution is a stage run per tile (the first with conv_in)
    from the previous stage's blended checkpoint; the blocks at the latent resolution, the mid-block
    (self-attention over all positions) and the output head run on the whole latent. Returns the
    posterior moments like ``encoder(x)``.
    """
    scale = _encoder_scale(encoder)
    if x.shape[-2] % scale or x.shape[-1] % scale:
        raise ValueError(f"tiled encoding needs sides that are multiples of {scale}, got {tuple(x.shape[-2:])}")
    tiles = plan_tiles(x.shape[-2] // scale, x.shape[-1] // scale, tile_size, overlap)
    blocks = list(encoder.down_blocks)
    halving = [block for block in blocks if block.downsamplers is not None]
    h, dtype = x, x.dtype
    for i, block in enumerate(halving):

        def body(t: torch.Tensor, block=block, first=i == 0) -> torch.Tensor:
            return block(encoder.conv_in(t) if first else t)

        h = run_stage(body, h, tiles, scale, _group_norms(block), group_norm, dtype, _checkpoint_dtype(dtype))
        scale //= 2
    h = h.to(dtype)
    if not halving:
        h = encoder.conv_in(h)
    for block in blocks[len(halving):]:
        h = block(h)
    h = whole_mid_block(encoder.mid_block, h)
    return encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))


def whole_mid_block(mid_block: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``mid_block(x)`` (resnet, self-attention, resnet over the whole latent) with the attention
    computed ``chunk`` queries at a time: the same numbers, and instead of all queries, attention
    outputs and projections at once only the keys, values and one chunk's."""
    x = mid_block.resnets[0](x)
    for attention in mid_block.attentions:
        x = _chunked_self_attention(attention, x, chunk)
    return mid_block.resnets[1](x)


def _chunked_self_attention(attention: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Our VAE's single-head ``SelfAttention`` forward, a chunk of queries at a time; the result is
    laid out as the module's (a channels-last view), so later layers run the same kernels."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    tokens = attention.group_norm(flat).transpose(1, 2)  # (B, HW, C)
    k, v = attention.to_k(tokens).unsqueeze(1), attention.to_v(tokens).unsqueeze(1)
    out = flat.new_empty(b, h * w, c)
    for start in range(0, h * w, chunk):
        q = attention.to_q(tokens[:, start:start + chunk]).unsqueeze(1)
        attended = attention.attend(q, k, v).squeeze(1)
        out[:, start:start + chunk] = attention.to_out[0](attended) + flat[:, :, start:start + chunk].transpose(1, 2)
    return out.transpose(1, 2).reshape(b, c, h, w)


def _encoder_scale(encoder: nn.Module) -> int:
    return 2 ** sum(block.downsamplers is not None for block in encoder.down_blocks)


# --------------------------------------------------------------------------------------------------
# A seam measure


def seam_ratio(image: torch.Tensor, rows: Sequence[int], cols: Sequence[int]) -> float:
    """Gradient energy across the given borders over the gradient energy elsewhere (≈ 1: no seam).

    ``image``: (..., H, W). ``rows``/``cols``: border positions in pixels; the border at ``c`` lies
    between columns c − 1 and c. Energy: mean squared difference of neighbouring pixels across the
    border, over all channels and the border's length.
    """
    image = image.double()
    dx = (image[..., :, 1:] - image[..., :, :-1]) ** 2  # dx[..., c - 1] is across the border at c
    dy = (image[..., 1:, :] - image[..., :-1, :]) ** 2
    at_x = torch.zeros(dx.shape[-1], dtype=torch.bool)
    at_y = torch.zeros(dy.shape[-2], dtype=torch.bool)
    at_x[[c - 1 for c in cols if 0 < c < image.shape[-1]]] = True
    at_y[[r - 1 for r in rows if 0 < r < image.shape[-2]]] = True
    seam = torch.cat([dx[..., at_x].flatten(), dy[..., at_y, :].flatten()])
    rest = torch.cat([dx[..., ~at_x].flatten(), dy[..., ~at_y, :].flatten()])
    return float(seam.mean() / rest.mean())


def tile_borders(tiles: Sequence[Tile], scale: int = 1) -> Tuple[List[int], List[int]]:
    """Rows and columns (pixels at ``scale``) where a tile starts or ends inside the image, or where
    tiles' cores meet: the places a seam would show."""
    rows = {p * scale for t in tiles for p in (t.y.start, t.y.end, t.y.core_start)}
    cols = {p * scale for t in tiles for p in (t.x.start, t.x.end, t.x.core_start)}
    height, width = max(t.y.end for t in tiles) * scale, max(t.x.end for t in tiles) * scale
    return sorted(r for r in rows if 0 < r < height), sorted(c for c in cols if 0 < c < width)
