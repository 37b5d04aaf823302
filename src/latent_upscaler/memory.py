"""Peak memory of an upscale, estimated before any work from the models' architecture.

    peak = resident + max(text, encode, unet, decode)

``resident``: what the process holds when the call starts: the weights of the text encoder, UNet
and VAE (their parameter and buffer bytes count in full) and, on the CPU, the Python/PyTorch
runtime, read together as the process's resident set size; on CUDA, the bytes PyTorch has
allocated. Each stage adds a base (what earlier stages leave behind, caches) and its working set,
which for these convolutional networks is a fixed number of copies of the stage's widest
full-resolution activation:

    unet    UNET_BASE   + UNET_LIVE   · batch·copies · H·W · unet.block_out_channels[0]   (latent H×W)
            (+ the bytes of the UNet's convolution weights for latents of at most PACK_MAX_AREA pixels)
    encode  ENCODE_BASE + ENCODE_LIVE · batch · H·W · vae.block_out_channels[0]           (input pixels)
    decode  DECODE_BASE + DECODE_LIVE · batch · H·W · vae.block_out_channels[0]           (output pixels)
            (in row bands, latent_upscaler.streaming, as the VAE decodes large outputs on the CPU:
            STREAM_LIVE copies instead of DECODE_LIVE, or the whole-latent mid-block if larger)

(copies = 2 with classifier-free guidance), times the bytes per element of the models' dtype. Tiled,
a stage's working set is that of one tile (plus one copy, for the GroupNorm statistics of its core),
plus what the tiled run keeps for the whole image: the blended output, for the VAE the float16
checkpoints between its stages (two at a time), and the parts of the VAE that run on the whole
latent (the mid-block: ``MID_LIVE`` copies of a latent-resolution activation of
vae.block_out_channels[-1] channels).

The factors and bases are measured, not guessed: ``bench/memory.py calibrate`` runs our pipeline
at three small sizes in fresh processes and records each stage's peak resident set size above the
one at the start of the call, then fits it linearly in the elements of the stage's widest
activation (the mid-block alone, at four sizes). ``bench/memory.py run`` checks whole upscales at
up to 4096 px against the estimate; README "Large images" has both. On CUDA the same factors are
used, uncalibrated.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Optional, Union

import torch

from .models.ops import return_freed_memory

GiB = 1024**3
MiB = 1024**2

# What each stage adds to the resident bytes at the start of the call: ``*_LIVE`` copies of its widest
# full-resolution activation plus ``*_BASE`` bytes whatever the size (what earlier stages left: the
# runtime's first-call growth after the text encoder, the UNet's text keys/values during sampling,
# oneDNN's reordered weights). bench/memory.py calibrate, full-size architecture, float32, CPU,
# torch 2.13 (README "Large images" lists the fits). The UNet's: ``bench/memory.py child stage
# --stage unet`` at latents of 32, 64 and 128 without packed weights (growth 0.13, 0.23, 0.61 GiB:
# 10.7 copies + 0.11 GiB), rounded up, plus the runtime's growth left by the text encoder.
TEXT_BASE = 340 * 1024**2
UNET_LIVE, UNET_BASE = 11.0, 450 * 1024**2
ENCODE_LIVE, ENCODE_BASE = 5.5, 370 * 1024**2
DECODE_LIVE, DECODE_BASE = 7.1, 510 * 1024**2
MID_LIVE = 7.6  # the VAE mid-block on the whole latent (tiled VAE), copies of a latent-resolution activation
#: the streamed decode (latent_upscaler.streaming): its output-resolution activation, the chunks of the
#: next one and the bands; the VAE alone grows by 0.25, 0.66 and 2.26 GiB at 512, 1024 and 2048 px
#: (bench/streaming.py: 1.04 copies + 0.13 GiB above 1024 px), rounded up, with DECODE_BASE for what
#: the call's earlier stages leave
STREAM_LIVE = 1.25
#: a tile's extra copy: the GroupNorm statistics of its core are taken from a copy
TILE_EXTRA = 1.0
#: copies of the decoded image (float pixels, B × 3 × H × W) around the decode: the blended output, the
#: weight sum, and postprocessing to [0, 1] and to numpy
IMAGE_COPIES = 5
#: "auto" keeps this fraction of the available memory free, for what the estimate does not see
AUTO_HEADROOM = 0.1
#: a plan fits when its estimate is within this fraction of the budget below it
BUDGET_MARGIN = 0.05

MemoryLike = Union[int, float, str, None]


def parse_bytes(value: MemoryLike) -> Union[int, str, None]:
    """A memory budget: None (or "none": no limit), "auto", a number of bytes, or a string like
    "12GiB", "4.5 GB", "800M"."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory must be positive, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", value.lower())
        if match:
            number, prefix, binary = match.groups()
            unit = (1024 if binary else 1000) ** ("kmgt".index(prefix) + 1) if prefix else 1
            return parse_bytes(float(number) * unit)
    raise ValueError(f"max_memory {value!r} is not understood; pass a number of bytes, a size such as '12GiB' or "
                     "'4GB', 'auto' (the free memory of the device) or 'none' (no limit)")


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# What the device holds and has


def resident_bytes(device: torch.device) -> int:
    """What the process holds now: resident set size on the CPU, PyTorch's allocated bytes on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_kib("VmRSS") * 1024


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: MemAvailable on the CPU (Linux; else the free physical
    pages), and on CUDA the free device memory plus what PyTorch has cached but not allocated."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_budget(device: torch.device) -> int:
    """The budget "auto" stands for: what the process holds plus most of what is available."""
    return resident_bytes(device) + int((1 - AUTO_HEADROOM) * available_bytes(device))


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource  # not Linux: the peak is the best we have

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if os.uname().sysname == "Darwin" else 1)


#: hand memory PyTorch has freed but the C allocator keeps back to the system before a VAE stage, so
#: that it starts from what is really in use (the UNet's per-upscale caches would otherwise stay)
release_freed_memory = return_freed_memory


def model_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the models' parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for model in models:
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.data_ptr() not in seen or tensor.device.type == "meta":
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# The stages


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the estimate reads from the models' configs."""

    unet_width: int  # unet.block_out_channels[0]: channels at the latent resolution
    vae_widths: tuple  # vae.block_out_channels, pixel resolution first
    vae_out_channels: int  # image channels
    itemsize: int  # bytes per element of the models' dtype
    unet_conv_bytes: int = 0  # the UNet's convolution weights: packed copies of them for small latents
    stream_min_pixels: Optional[int] = None  # the VAE decodes outputs of this many pixels in row bands (None: never)

    @classmethod
    def of(cls, unet, vae) -> "Architecture":
        dtype = next(unet.parameters()).dtype
        convs = sum(m.weight.numel() * m.weight.element_size() for m in unet.modules()
                    if isinstance(m, torch.nn.Conv2d))
        from .streaming import hooked

        param = next(vae.parameters())
        streams = param.device.type == "cpu" and not hooked(vae.decoder)
        return cls(unet.config.block_out_channels[0], tuple(vae.config.block_out_channels), vae.config.out_channels,
                   torch.empty((), dtype=dtype).element_size(), convs,
                   getattr(vae, "stream_min_pixels", None) if streams else None)

    @property
    def vae_width(self) -> int:  # channels at the pixel resolution
        return self.vae_widths[0]

    @property
    def vae_deep_width(self) -> int:  # channels of the mid-block, at the latent resolution
        return self.vae_widths[-1]

    @property
    def vae_scale(self) -> int:  # pixels per latent pixel
        return 2 ** (len(self.vae_widths) - 1)

    @property
    def checkpoint_itemsize(self) -> int:  # tiling.run_stage keeps float32 checkpoints as float16
        return 2 if self.itemsize == 4 else self.itemsize


def unet_bytes(arch: Architecture, batch: int, height: int, width: int, tile: Optional[int] = None,
               tiles_per_batch: int = 1) -> int:
    """One denoiser evaluation on (batch, 4, height, width) latents (batch includes CFG copies),
    whole or in tiles of ``tile`` latent pixels; plus the sampler's latent-sized state."""
    from .conditioning import PACK_MAX_AREA

    state = 12 * batch * 4 * height * width * 4  # x, denoised, low-res cond, sampler history (float32)
    if tile is not None and max(height, width) > tile:
        height, width, batch = min(tile, height), min(tile, width), batch * tiles_per_batch
    packed = arch.unet_conv_bytes if height * width <= PACK_MAX_AREA else 0
    return int(UNET_LIVE * batch * height * width * arch.unet_width * arch.itemsize) + state + UNET_BASE + packed


def _per_tile(arch: Architecture, live: float, batch: int, height: int, width: int, tile: int) -> float:
    """Working set of one VAE tile (with the copy its GroupNorm statistics are taken from)."""
    s = arch.vae_scale
    return (live + TILE_EXTRA) * batch * min(tile * s, height) * min(tile * s, width) * arch.vae_width * arch.itemsize


def encode_bytes(arch: Architecture, batch: int, height: int, width: int, tile: Optional[int] = None) -> int:
    """VAE encoding of (batch, 3, height, width) pixels, whole or in tiles of ``tile`` latent pixels
    (stages per halving down block with float16 checkpoints between them, then the whole latent)."""
    s, item = arch.vae_scale, arch.itemsize
    if tile is None or max(height, width) <= tile * s:
        return int(ENCODE_LIVE * batch * height * width * arch.vae_width * item) + ENCODE_BASE
    latent_px = batch * (height // s) * (width // s)
    # checkpoint after down block i: widths[i] channels at s / 2^(i+1) pixels per latent pixel
    ckpts = [latent_px * w * (s // 2 ** (i + 1)) ** 2 * arch.checkpoint_itemsize
             for i, w in enumerate(arch.vae_widths[:-1])]
    per_tile = _per_tile(arch, ENCODE_LIVE, batch, height, width, tile)
    stages = max(sum(ckpts[max(i - 1, 0):i + 1]) for i in range(len(ckpts))) + per_tile if ckpts else per_tile
    whole = MID_LIVE * latent_px * arch.vae_deep_width * item + (ckpts[-1] if ckpts else 0)
    return int(max(stages, whole)) + ENCODE_BASE


def decode_bytes(arch: Architecture, batch: int, height: int, width: int, tile: Optional[int] = None) -> int:
    """VAE decoding to (batch, 3, height, width) pixels and making the image, whole or in tiles of
    ``tile`` latent pixels (the whole latent first, then stages per up block with float16
    checkpoints between them)."""
    s, item = arch.vae_scale, arch.itemsize
    image = IMAGE_COPIES * batch * 3 * height * width * 4
    latent_px = batch * (height // s) * (width // s)
    if tile is None or max(height, width) <= tile * s:
        if arch.stream_min_pixels is not None and height * width >= arch.stream_min_pixels:
            streamed = STREAM_LIVE * batch * height * width * arch.vae_width * item
            whole = MID_LIVE * latent_px * arch.vae_deep_width * item
            return int(max(streamed, whole, image)) + DECODE_BASE
        return int(max(DECODE_LIVE * batch * height * width * arch.vae_width * item, image)) + DECODE_BASE
    widths = arch.vae_widths[::-1]  # latent resolution first
    # checkpoint after up block i: widths[i] channels at 2^i pixels per latent pixel (block 0: model dtype)
    ckpts = [latent_px * widths[0] * item] + [latent_px * w * 4 ** i * arch.checkpoint_itemsize
                                              for i, w in enumerate(widths[1:-1], start=1)]
    pixels = batch * arch.vae_out_channels * height * width * item + height * width * 4  # output and weight sum
    per_tile = _per_tile(arch, DECODE_LIVE, batch, height, width, tile)
    pairs = [a + b for a, b in zip(ckpts, ckpts[1:])] + [ckpts[-1] + pixels]
    whole = MID_LIVE * latent_px * arch.vae_deep_width * item
    return int(max(whole, max(pairs) + per_tile, image)) + DECODE_BASE


@dataclasses.dataclass
class Estimate:
    """Estimated peak bytes: ``resident`` plus the largest stage."""

    resident: int
    stages: Dict[str, int]

    @property
    def peak(self) -> int:
        return self.resident + max(self.stages.values(), default=0)

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(b)}" for name, b in self.stages.items())
        return f"{format_bytes(self.peak)} (resident {format_bytes(self.resident)}; {parts})"


def estimate(arch: Architecture, resident: int, batch: int, copies: int, low_res: tuple, pixel_input: bool,
             unet_tile: Optional[int] = None, vae_tile: Optional[int] = None, vae_batch: Optional[int] = None,
             tiles_per_batch: int = 1) -> Estimate:
    """The peak of an upscale of ``batch`` images whose low-res latents are ``low_res`` = (h, w)
    (padded); ``copies`` = 2 with classifier-free guidance; ``pixel_input``: encoded by the VAE.
    ``vae_batch``: images per VAE call (1 with VAE slicing)."""
    h, w = low_res
    s = arch.vae_scale
    vae_batch = batch if vae_batch is None else vae_batch
    stages = {"text": TEXT_BASE}
    if pixel_input:
        stages["encode"] = encode_bytes(arch, vae_batch, h * s, w * s, vae_tile)
    stages["unet"] = unet_bytes(arch, batch * copies, 2 * h, 2 * w, unet_tile, tiles_per_batch)
    stages["decode"] = decode_bytes(arch, vae_batch, 2 * h * s, 2 * w * s, vae_tile)
    return Estimate(resident, stages)


# --------------------------------------------------------------------------------------------------
# Choosing the tiles


class MemoryBudgetError(ValueError):
    """The upscale cannot fit in ``max_memory`` even in the smallest tiles."""


#: tile sides tried, largest first, in latent pixels of the output (× 8 for image pixels); the
#: smallest ones are the least the models work well with
UNET_TILES = (512, 384, 256, 192, 128, 96, 64, 48, 32)
VAE_TILES = (256, 192, 128, 96, 64, 48, 32)
#: the VAE tiles' default overlap in latent pixels: each stage restarts from an exact checkpoint, so
#: a tile's border disturbs only the few pixels one stage's convolutions reach (2–4 latent pixels)
VAE_OVERLAP = 8


@dataclasses.dataclass
class TilingPlan:
    """How an upscale runs: ``unet_tile``/``vae_tile`` in latent pixels (None: untiled), their
    overlaps, and the estimate that chose them (``budget`` None: no limit was set)."""

    unet_tile: Optional[int]
    unet_overlap: int
    vae_tile: Optional[int]
    vae_overlap: int
    estimate: Estimate
    budget: Optional[int] = None

    def wrap(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """The denoiser evaluated in tiles (:class:`~latent_upscaler.tiling.TiledDenoiser`), or itself."""
        if self.unet_tile is None:
            return denoiser
        from .tiling import TiledDenoiser

        return TiledDenoiser(denoiser, self.unet_tile, self.unet_overlap)

    def vae_tiling(self, vae):
        """A context in which ``vae`` encodes and decodes in the planned tiles (its own tiling
        switch, as the user set it, when the plan has none), restored afterwards. Entering it
        releases freed memory first (:func:`release_freed_memory`), which the estimate counts on."""
        import contextlib

        @contextlib.contextmanager
        def context():
            release_freed_memory()
            saved = (vae.use_tiling, vae.tile_size, vae.tile_overlap, vae.tile_group_norm)
            if self.vae_tile is not None:
                vae.enable_tiling(self.vae_tile, self.vae_overlap, vae.tile_group_norm)
            try:
                yield vae
            finally:
                vae.use_tiling, vae.tile_size, vae.tile_overlap, vae.tile_group_norm = saved

        return context()

    def __str__(self) -> str:
        unet = "untiled" if self.unet_tile is None else f"tiles of {self.unet_tile} (overlap {self.unet_overlap})"
        vae = "untiled" if self.vae_tile is None else f"tiles of {self.vae_tile} (overlap {self.vae_overlap})"
        budget = "no limit" if self.budget is None else format_bytes(self.budget)
        return f"UNet {unet}, VAE {vae} latent pixels; estimated peak {self.estimate}; budget {budget}"


def _default_overlap(tile: int, multiple: int) -> int:
    return max(multiple, tile // 4 // multiple * multiple)


def plan_tiling(pipe, low_res: tuple, batch: int, copies: int, pixel_input: bool,
                max_memory: MemoryLike = "auto", tile_size: Optional[int] = None,
                vae_tile_size: Optional[int] = None, tile_overlap: Optional[int] = None,
                resident: Optional[int] = None) -> TilingPlan:
    """Choose the largest tiles (or none) whose estimated peak fits ``max_memory``.

    ``low_res``: (h, w) of the padded low-res latents; the output is (2h, 2w) latent pixels, 16h × 16w
    image pixels. ``copies``: 2 with classifier-free guidance. ``tile_size``/``vae_tile_size``/
    ``tile_overlap``: in *output image pixels*, given to override the choice (UNet tiles and overlaps
    multiples of 64, VAE ones of 8). ``resident``: bytes held now (measured when None).
    Raises :class:`MemoryBudgetError` before any work when even the smallest tiles do not fit.
    """
    arch = Architecture.of(pipe.unet, pipe.vae)
    scale, unet_unit = arch.vae_scale, arch.vae_scale * 8  # image pixels per latent pixel; per UNet tile unit
    device = pipe.device
    budget = parse_bytes(max_memory)
    if budget == "auto":
        budget = auto_budget(device)
    resident = resident_bytes(device) if resident is None else resident
    h, w = low_res
    out_h, out_w = 2 * h, 2 * w  # output latent
    vae_batch = 1 if getattr(pipe.vae, "use_slicing", False) else batch

    unet_tile = _pixels_to_latent(tile_size, unet_unit, scale, "tile_size", minimum=16)
    vae_tile = _pixels_to_latent(vae_tile_size, scale, scale, "vae_tile_size", minimum=8)
    overlap_px = tile_overlap

    def fit(stage, candidates):
        """The first candidate tile whose stage fits, and the stage's bytes."""
        best = None
        for tile in candidates:
            need = stage(tile)
            best = (tile, need) if best is None or need < best[1] else best
            if budget is None or resident + need <= (1 - BUDGET_MARGIN) * budget:
                return tile, need, True
        return best[0], best[1], False

    def unet_stage(tile):
        return unet_bytes(arch, batch * copies, out_h, out_w, tile)

    def vae_stage(tile):
        need = decode_bytes(arch, vae_batch, out_h * scale, out_w * scale, tile)
        if pixel_input:
            need = max(need, encode_bytes(arch, vae_batch, h * scale, w * scale, tile))
        return need

    side = max(out_h, out_w)
    if unet_tile is None and budget is not None:
        unet_tile, _, _ = fit(unet_stage, [None] + [t for t in UNET_TILES if t < side])
    if vae_tile is None and budget is not None:
        vae_tile, _, _ = fit(vae_stage, [None] + [t for t in VAE_TILES if t < side])
    unet_overlap = vae_overlap = 0
    if unet_tile is not None:
        unet_overlap = (_pixels_to_latent(overlap_px, unet_unit, scale, "tile_overlap", minimum=0)
                        if overlap_px is not None else _default_overlap(unet_tile, 8))
    if vae_tile is not None:
        vae_overlap = (_pixels_to_latent(overlap_px, scale, scale, "tile_overlap", minimum=0)
                       if overlap_px is not None else min(VAE_OVERLAP, vae_tile // 2))
    for name, tile, overlap in (("tile_size", unet_tile, unet_overlap), ("vae_tile_size", vae_tile, vae_overlap)):
        if tile is not None and overlap >= tile:
            raise ValueError(f"tile_overlap ({overlap * scale} px) must be smaller than {name} ({tile * scale} px)")

    estimate_ = estimate(arch, resident, batch, copies, (h, w), pixel_input, unet_tile, vae_tile, vae_batch)
    plan = TilingPlan(unet_tile, unet_overlap, vae_tile, vae_overlap, estimate_, budget)
    if budget is not None and estimate_.peak > (1 - BUDGET_MARGIN) * budget:
        raise MemoryBudgetError(_too_small_message(plan, arch, batch, copies, (h, w), pixel_input, vae_batch))
    return plan


def _pixels_to_latent(pixels: Optional[int], unit: int, scale: int, name: str, minimum: int) -> Optional[int]:
    """Output image pixels → latent pixels; ``unit``: the pixel multiple the value must be."""
    if pixels is None:
        return None
    if not isinstance(pixels, int) or pixels % unit or pixels < minimum * scale:
        raise ValueError(f"{name} must be a multiple of {unit} image pixels and at least {max(minimum * scale, unit)}, "
                         f"got {pixels!r}")
    return pixels // scale


def _too_small_message(plan: TilingPlan, arch: Architecture, batch: int, copies: int, low_res: tuple,
                       pixel_input: bool, vae_batch: int) -> str:
    h, w = low_res
    s = arch.vae_scale
    smallest = estimate(arch, plan.estimate.resident, batch, copies, low_res, pixel_input,
                        UNET_TILES[-1], VAE_TILES[-1], vae_batch)
    least = smallest.peak
    # the largest square output that fits, in steps of 128 image pixels
    side = 0
    for latent in range(8, 4 * max(h, w) + 1, 8):  # low-res side in latent pixels
        e = estimate(arch, plan.estimate.resident, batch, copies, (latent, latent), pixel_input,
                     UNET_TILES[-1] if 2 * latent > UNET_TILES[-1] else None,
                     VAE_TILES[-1] if 2 * latent > VAE_TILES[-1] else None, vae_batch)
        if e.peak > (1 - BUDGET_MARGIN) * plan.budget:
            break
        side = 2 * latent * s
    fits = f"the largest square output that fits is {side} px" if side else "no output size fits"
    stages = ", ".join(f"{name} {format_bytes(b)}" for name, b in smallest.stages.items())
    return (f"max_memory {format_bytes(plan.budget)} is too small for a {2 * w * s}×{2 * h * s} px output "
            f"(batch {batch}): the models and runtime already hold {format_bytes(plan.estimate.resident)}, and even "
            f"the "
            f"smallest tiles (UNet {UNET_TILES[-1] * s} px, VAE {VAE_TILES[-1] * s} px) need an estimated "
            f"{format_bytes(least)} in all ({stages}). "
            f"Give max_memory of at least "
            f"{format_bytes(least / (1 - BUDGET_MARGIN))}, or a smaller "
            f"image or batch: at this budget {fits}.")


def plan_call(pipe, prepared, batch_size: int, copies: int, max_memory: MemoryLike = "auto",
              tile_size: Optional[int] = None, vae_tile_size: Optional[int] = None,
              tile_overlap: Optional[int] = None) -> TilingPlan:
    """:func:`plan_tiling` for the pipeline's call: ``prepared`` is its
    :class:`~latent_upscaler.images.PreparedImage` (padded latents, or pixels to encode)."""
    scale = 1 if prepared.is_latent else Architecture.of(pipe.unet, pipe.vae).vae_scale
    low_res = (prepared.tensor.shape[2] // scale, prepared.tensor.shape[3] // scale)
    return plan_tiling(pipe, low_res, batch_size, copies, not prepared.is_latent, max_memory, tile_size,
                       vae_tile_size, tile_overlap)
