"""Large images: tile planning, MultiDiffusion over UNet tiles, tiled VAE with whole-image GroupNorm
statistics, the seam measure, the memory budget. Tiny models, offline."""

import pytest
import torch

from latent_upscaler import memory, tiling
from latent_upscaler.conditioning import UpscalerConditioning, prepare_conditioning
from latent_upscaler.denoiser import KarrasDenoiser
from latent_upscaler.guidance import ClassifierFreeGuidance
from latent_upscaler.models.vae import AutoencoderKL, VAEConfig

TINY_VAE = dict(block_out_channels=[32, 32, 64, 64])  # reference §5.1


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(**TINY_VAE)).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def diffs(a, b):
    d = (a - b).abs()
    return d.max().item(), d.mean().item()


# ---- planning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap,multiple", [
    (64, 32, 8, 8), (72, 32, 16, 8), (200, 64, 16, 8), (33, 16, 4, 1), (100, 48, 47, 1), (16, 32, 8, 8), (40, 40, 8, 8),
])
def test_plan_axis_covers_every_pixel_with_valid_tiles(size, tile, overlap, multiple):
    spans = tiling.plan_axis(size, tile, overlap, multiple)
    assert spans[0].start == 0 and spans[-1].end == size
    covered = torch.zeros(size, dtype=torch.int32)
    owned = torch.zeros(size, dtype=torch.int32)
    assert len({span.size for span in spans}) == 1 and spans[0].size <= min(tile, size)
    fewest = 1 if tile >= size else 1 + -(-(size - tile) // (tile - overlap))
    assert len(spans) == fewest
    if len(spans) > 1:  # shrunk as far as the multiple allows: one multiple less would not cover
        shorter = spans[0].size - multiple
        assert len(spans) * shorter - (len(spans) - 1) * overlap < size
    for span in spans:
        assert span.start % multiple == 0 and 0 <= span.start < span.end <= size
        assert span.start <= span.core_start < span.core_end <= span.end
        covered[span.start:span.end] += 1
        owned[span.core_start:span.core_end] += 1
    assert covered.min() >= 1 and (owned == 1).all()  # cores partition the axis
    for a, b in zip(spans, spans[1:]):
        assert a.end - b.start >= overlap  # at least the requested overlap
        assert a.ramp_after == b.ramp_before == a.end - b.start
    total = torch.zeros(size)
    for span in spans:
        total[span.start:span.end] += span.weights()
    assert total.min() > 0.5  # every pixel has weight to normalise by


def test_two_tile_weights_sum_to_one_and_are_smooth():
    a, b = tiling.plan_axis(48, 32, 16)
    total = torch.zeros(48)
    total[a.start:a.end] += a.weights()
    total[b.start:b.end] += b.weights()
    assert torch.allclose(total, torch.ones(48), atol=1e-6)
    ramp = b.weights()[: b.ramp_before]
    assert (ramp.diff() > 0).all() and ramp[0] < 0.01 and ramp[-1] > 0.99


@pytest.mark.parametrize("overlap,scale,margin", [(8, 2, 8), (8, 8, 8), (2, 2, 8), (16, 1, 3)])
def test_weights_with_edge_margins_sum_to_one_and_ignore_the_edges(overlap, scale, margin):
    a, b = tiling.plan_axis(48, 32, overlap)[:2]
    total = torch.zeros(48 * scale)
    wa, wb = a.weights(scale, margin), b.weights(scale, margin)
    total[a.start * scale:a.end * scale] += wa
    total[b.start * scale:b.end * scale] += wb
    assert torch.allclose(total[:b.end * scale], torch.ones(b.end * scale), atol=1e-6)
    n = (a.end - b.start) * scale
    m = min(margin, (n - 2) // 2)
    assert (wb[:m] == 0).all() and (wa[len(wa) - m:] == 0).all()  # the edges a tile cannot see beyond
    assert (wb[m:n - m] > 0).all() and (wb[m:n - m].diff() > 0).all()


def test_plan_tiles_for_the_unet_respects_its_size_rules():
    tiles = tiling.plan_tiles(136, 72, 48, 16, tiling.UNET_MULTIPLE)
    for t in tiles:
        for span in (t.y, t.x):
            assert span.size % 8 == 0 and span.size >= 16 and span.start % 8 == 0
    assert len({(t.y.start, t.x.start) for t in tiles}) == len(tiles)


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap"):
        tiling.plan_axis(64, 16, 16)
    with pytest.raises(ValueError, match="multiples"):
        tiling.plan_axis(64, 20, 8, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiling.TiledDenoiser(lambda x, s: x, 20, 8)


# ---- the UNet: MultiDiffusion --------------------------------------------------------------------


class PointwiseDenoiser(torch.nn.Module):
    """A denoiser without spatial context: tiling must not change its result at all."""

    def forward(self, x, sigma, *, low_res_cond, timestep_cond, encoder_hidden_states):
        sigma = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
        return (x * torch.tanh(low_res_cond) / (1 + sigma) + timestep_cond[:, :4, None, None]
                + encoder_hidden_states[:, :1, :4].transpose(1, 2)[..., None])


@pytest.mark.parametrize("tiles_per_batch", [1, 3])
@pytest.mark.parametrize("sigma", [torch.tensor(2.0), torch.tensor([2.0, 0.5])])
def test_tiled_denoiser_is_exact_for_a_pointwise_model_with_guidance(tiles_per_batch, sigma):
    x = randn(2, 4, 56, 40)
    cond = {"low_res_cond": randn(4, 4, 56, 40, seed=1), "timestep_cond": randn(4, 8, seed=2),
            "encoder_hidden_states": randn(4, 77, 8, seed=3)}  # CFG: unconditional half first
    model = ClassifierFreeGuidance(PointwiseDenoiser(), 7.5)
    tiled = tiling.TiledDenoiser(model, 24, 8, tiles_per_batch=tiles_per_batch)
    assert len(tiled.plan(56, 40)[0]) > 3
    assert diffs(tiled(x, sigma, **cond), model(x, sigma, **cond))[0] < 1e-5


def test_tiled_denoiser_passes_small_latents_through():
    model = PointwiseDenoiser()
    x = randn(1, 4, 32, 24)
    cond = {"low_res_cond": randn(1, 4, 32, 24), "timestep_cond": randn(1, 8), "encoder_hidden_states": randn(1, 77, 8)}
    sigma = torch.tensor(1.0)
    assert torch.equal(tiling.TiledDenoiser(model, 32, 8)(x, sigma, **cond), model(x, sigma, **cond))


def test_tiled_unet_agrees_with_untiled(tiny_pipe):
    """Tiny UNet, 48×32 latent, tiles of 32 overlapping by 16: the denoised estimates differ only by
    what attention and GroupNorm see beyond a tile (measured: max 0.22, mean 0.035, on estimates of
    mean magnitude 0.8)."""
    low_res = randn(1, 4, 24, 16)
    cond = prepare_conditioning(low_res, torch.zeros(1), randn(1, 32, seed=4), None)
    cond["encoder_hidden_states"] = randn(1, 77, 32, seed=5)
    denoiser = KarrasDenoiser(UpscalerConditioning(tiny_pipe.unet))
    x, sigma = randn(1, 4, 48, 32, seed=6) * 2, torch.tensor(2.0)
    with torch.no_grad():
        whole = denoiser(x, sigma, **cond)
        tiled = tiling.TiledDenoiser(denoiser, 32, 16)(x, sigma, **cond)
    worst, mean = diffs(tiled, whole)
    assert worst < 0.35 and mean < 0.05, (worst, mean, whole.abs().mean())


# ---- the VAE -------------------------------------------------------------------------------------


def test_vae_tiling_switch_round_trips(vae):
    z = randn(1, 4, 24, 16)
    with torch.no_grad():
        plain = vae.decode(z).sample
        vae.enable_tiling(16, 8)
        assert vae.use_tiling and (vae.tile_size, vae.tile_overlap, vae.tile_group_norm) == (16, 8, "global")
        vae.enable_tiling(16, 8, "tile")  # one pass: cheaper, and enough to see the switch work
        tiled = vae.decode(z).sample
        small = vae.decode(z[..., :16, :16]).sample  # no larger than a tile: one pass
        vae.disable_tiling()
        again = vae.decode(z).sample
    assert not vae.use_tiling
    assert tiled.shape == plain.shape and not torch.equal(tiled, plain)
    assert torch.equal(again, plain)
    assert torch.equal(small, vae.decode(z[..., :16, :16]).sample)
    with pytest.raises(ValueError, match="group_norm"):
        vae.enable_tiling(16, 8, "batch")


def test_pipeline_switch_reaches_the_vae(tiny_pipe):
    tiny_pipe.enable_vae_tiling()
    try:
        assert tiny_pipe.vae.use_tiling
    finally:
        tiny_pipe.disable_vae_tiling()
    assert not tiny_pipe.vae.use_tiling


def fine_detail(size, seed):
    """Latents of white noise (detail at every pixel) whose contrast and tone change across the
    image: a left half of low contrast, a right half of high contrast, slow colour waves."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    waves = 2 * torch.sin(3 * yy)[None, None] * torch.tensor([1.0, -1, 0.5, 0])[None, :, None, None]
    return randn(1, 4, size, size, seed=seed) * (0.3 + 2.5 * (xx > 0.5)) + waves


@pytest.fixture(scope="module")
def decodes(vae):
    """24×24 latents (192 px) decoded whole and in tiles of 16 overlapping by 8 (2×2 tiles)."""
    out = {}
    with torch.no_grad():
        for name, z in (("noise", randn(1, 4, 24, 24, seed=7)), ("detail", fine_detail(24, seed=7))):
            out[name, "whole"] = vae.decode(z).sample
            for mode, tile, overlap, group_norm in (("global", 16, 8, "global"), ("local", 16, 8, "tile"),
                                                    ("naive", 12, 0, "tile")):
                if (name, mode) in (("noise", "naive"), ("detail", "local")):
                    continue
                vae.enable_tiling(tile, overlap, group_norm)
                out[name, mode] = vae.decode(z).sample
            vae.disable_tiling()
    return out


def test_tiled_decode_agrees_with_untiled_and_global_statistics_help(decodes):
    """Exact whole-image GroupNorm statistics (a pass per layer) against per-tile statistics (one
    pass, as diffusers): measured max 0.069 / mean 0.0027 against max 0.91 / mean 0.058, on outputs
    of mean magnitude 0.26. What is left comes from the tiles' borders."""
    whole = decodes["noise", "whole"]
    g_max, g_mean = diffs(decodes["noise", "global"], whole)
    l_max, l_mean = diffs(decodes["noise", "local"], whole)
    assert g_max < 0.12 and g_mean < 0.005, (g_max, g_mean)
    assert g_mean < 0.1 * l_mean and g_max < 0.2 * l_max, (g_mean, l_mean)


def test_no_seam_on_fine_detail_and_the_measure_sees_seams(decodes):
    """The seam measure (gradient energy across tile borders over that elsewhere) on a decode of
    latents full of fine detail whose contrast changes across the image: the tiled decode's is the
    untiled decode's within 2 % (measured 1.0515 against 1.0507; with per-tile statistics 1.171);
    two tiles stitched without overlap, each with its own statistics, are caught (1.89 against 0.76
    at their border)."""
    whole = decodes["detail", "whole"]
    assert diffs(decodes["detail", "global"], whole)[1] < 0.005
    rows, cols = tiling.tile_borders(tiling.plan_tiles(24, 24, 16, 8), 8)
    tiled_ratio = tiling.seam_ratio(decodes["detail", "global"], rows, cols)
    assert abs(tiled_ratio / tiling.seam_ratio(whole, rows, cols) - 1) < 0.02
    naive_border = ([96], [96])  # tiles of 12 latent pixels, no overlap
    assert tiling.seam_ratio(decodes["detail", "naive"], *naive_border) > 1.5 * tiling.seam_ratio(whole, *naive_border)


def test_tiled_encode_agrees_with_untiled(vae):
    """Tiny VAE, 128×192 pixels in tiles of 128 overlapping by 64: measured max 0.011, mean 0.0013
    (per-tile statistics: 0.056, 0.0088) on posterior means of mean magnitude 0.24."""
    x = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).latent_dist.mean
        vae.enable_tiling(16, 8)
        tiled = vae.encode(x).latent_dist.mean
        vae.disable_tiling()
    worst, mean = diffs(tiled, whole)
    assert worst < 0.03 and mean < 0.003, (worst, mean)


def test_whole_mid_block_in_query_chunks_equals_the_module(vae):
    x = randn(2, 64, 12, 10, seed=11)
    with torch.no_grad():
        for mid in (vae.decoder.mid_block, vae.encoder.mid_block):
            ours, theirs = tiling.whole_mid_block(mid, x, chunk=16), mid(x)
            assert diffs(ours, theirs)[0] < 1e-5 and ours.stride() == theirs.stride()


def test_stage_statistics_are_the_whole_image_statistics(vae):
    """The statistics a stage measures over tile cores equal the untiled layer inputs' statistics:
    exactly for the first layer (its input is the checkpoint itself: this checks the core
    partition and the float64 merge), up to the tiles' border effects for later ones."""
    block = vae.decoder.up_blocks[1]
    x = randn(1, 64, 20, 12, seed=12)
    tiles = tiling.plan_tiles(20, 12, 8, 4)
    norms = tiling._group_norms(block)
    seen = {}
    def record(norm, args):
        seen.setdefault(id(norm), args[0].reshape(1, norm.num_groups, -1))

    hooks = [n.register_forward_pre_hook(record) for n in norms]
    with torch.no_grad():
        h = x
        for resnet in block.resnets:
            h = resnet(h)
    for hook in hooks:
        hook.remove()

    def body(t):
        for resnet in block.resnets:
            t = resnet(t)
        return t

    stats = tiling.WholeImageGroupNorm(norms)
    with torch.no_grad(), stats.patched():
        for i in range(len(norms)):
            stats.measuring = i
            for tile in tiles:
                stats.tile = tile
                with pytest.raises(tiling._Measured):
                    body(x[(..., *tile.window())])
    for i, norm in enumerate(norms):
        count, mean, m2 = stats.stats[i]
        var, whole_mean = torch.var_mean(seen[id(norm)].double(), dim=-1, unbiased=False)
        assert count == seen[id(norm)].shape[-1]
        tolerance = 1e-6 if i == 0 else 0.05
        assert torch.allclose(mean, whole_mean, atol=tolerance) and torch.allclose(m2 / count, var, rtol=tolerance)


# ---- the memory budget ---------------------------------------------------------------------------


def test_parse_bytes():
    assert memory.parse_bytes("12GiB") == 12 * 2**30
    assert memory.parse_bytes("4 GB") == 4 * 10**9
    assert memory.parse_bytes("800M") == 800 * 10**6
    assert memory.parse_bytes(1234) == 1234 and memory.parse_bytes("auto") == "auto"
    assert memory.parse_bytes(None) is None
    for bad in ("lots", -1, "12 parsecs"):
        with pytest.raises(ValueError, match="max_memory"):
            memory.parse_bytes(bad)


def test_auto_budget_reads_the_machine():
    assert 0 < memory.resident_bytes("cpu") < memory.auto_budget("cpu")
    assert memory.available_bytes("cpu") > 0


def _smallest_tiles(pipe, low_res, resident):
    arch = memory.Architecture.of(pipe.unet, pipe.vae)
    return memory.estimate(arch, resident, 1, 2, low_res, True, memory.UNET_TILES[-1], memory.VAE_TILES[-1]).peak


def test_budget_chooses_tiles_only_when_needed(tiny_pipe):
    args = dict(low_res=(256, 256), batch=1, copies=2, pixel_input=True, resident=10**9)
    free = memory.plan_tiling(tiny_pipe, max_memory=None, **args)
    assert free.unet_tile is None and free.vae_tile is None and free.budget is None
    untiled, smallest = free.estimate.peak, _smallest_tiles(tiny_pipe, (256, 256), 10**9)
    assert smallest < untiled
    margin = 1 - memory.BUDGET_MARGIN
    roomy = memory.plan_tiling(tiny_pipe, max_memory=int(untiled / margin) + 1, **args)
    assert roomy.unet_tile is None and roomy.vae_tile is None
    tight = memory.plan_tiling(tiny_pipe, max_memory=int((smallest + untiled) / 2 / margin), **args)
    assert tight.unet_tile is not None or tight.vae_tile is not None
    assert tight.estimate.peak <= margin * tight.budget and tight.estimate.peak < untiled
    if tight.unet_tile:
        assert tight.unet_tile % 8 == 0 and 0 < tight.unet_overlap < tight.unet_tile
    explicit = memory.plan_tiling(tiny_pipe, max_memory=None, tile_size=1024, vae_tile_size=512, tile_overlap=256,
                                  **args)
    assert (explicit.unet_tile, explicit.unet_overlap, explicit.vae_tile, explicit.vae_overlap) == (128, 32, 64, 32)


def test_budget_that_nothing_fits_fails_before_any_work_and_says_what_fits(tiny_pipe):
    budget = int(0.9 * _smallest_tiles(tiny_pipe, (512, 512), 10**9))
    with pytest.raises(memory.MemoryBudgetError, match=r"at least .* GiB.*largest square output that fits is \d+ px"):
        memory.plan_tiling(tiny_pipe, (512, 512), 1, 2, True, max_memory=budget, resident=10**9)
    with pytest.raises(memory.MemoryBudgetError, match="no output size fits"):
        memory.plan_tiling(tiny_pipe, (64, 64), 1, 2, True, max_memory=10**9, resident=10**9)


def test_estimates_grow_with_the_image_and_shrink_with_tiles():
    arch = memory.Architecture(unet_width=384, vae_widths=(128, 256, 512, 512), vae_out_channels=3, itemsize=4)
    unet = lambda n, tile=None: memory.unet_bytes(arch, 2, n, n, tile) - memory.UNET_BASE  # noqa: E731
    assert unet(128) == pytest.approx(4 * unet(64), rel=0.01)
    assert unet(256, tile=64) < unet(64) * 1.5
    assert memory.decode_bytes(arch, 1, 4096, 4096, tile=64) < memory.decode_bytes(arch, 1, 4096, 4096) / 10
    assert memory.encode_bytes(arch, 1, 2048, 2048, tile=64) < memory.encode_bytes(arch, 1, 2048, 2048) / 4


def test_plan_applies_to_the_denoiser_and_restores_the_vae(tiny_pipe):
    plan = memory.plan_tiling(tiny_pipe, (32, 32), 1, 1, False, max_memory=None, tile_size=256, vae_tile_size=256)
    wrapped = plan.wrap(PointwiseDenoiser())
    assert isinstance(wrapped, tiling.TiledDenoiser) and wrapped.tile_size == 32
    vae = tiny_pipe.vae
    with plan.vae_tiling(vae):
        assert vae.use_tiling and vae.tile_size == 32
    assert not vae.use_tiling and vae.tile_size == 64


# ---- sampled statistics --------------------------------------------------------------------------


def test_spread_tiles_picks_strata_middles():
    tiles = tiling.plan_tiles(80, 40, 16, 4)  # 7 rows × 3 columns of tiles
    rows = sorted({t.y.start for t in tiles})
    cols = sorted({t.x.start for t in tiles})
    assert (len(rows), len(cols)) == (7, 3)
    picked = tiling.spread_tiles(tiles)
    assert {t.y.start for t in picked} == {rows[1], rows[3], rows[5]}  # k = 3 of 7: the middles of 3 strips
    assert {t.x.start for t in picked} == set(cols)  # 3 or fewer: all (exact statistics)
    assert len(tiling.spread_tiles(tiling.plan_tiles(16, 16, 16, 4))) == 1


def test_sampled_statistics_give_one_tone_close_to_the_whole_images(vae):
    """A 5 × 5 grid of tiles whose statistics come from 2 × 2 of them: no seam, and close to the
    exact whole-image statistics (measured: max 0.056 / mean 0.0030 against 0.044 / 0.0025 for the
    exact ones; per-tile statistics 0.73 / 0.049)."""
    z = fine_detail(40, seed=9)
    out = {}
    with torch.no_grad():
        out["whole"] = vae.decode(z).sample
        for mode in tiling.GROUP_NORM_MODES:
            vae.enable_tiling(12, 4, mode)
            out[mode] = vae.decode(z).sample
        vae.disable_tiling()
    assert len(tiling.spread_tiles(tiling.plan_tiles(40, 40, 12, 4))) == 4
    s_max, s_mean = diffs(out["sampled"], out["whole"])
    g_max, g_mean = diffs(out["global"], out["whole"])
    t_max, t_mean = diffs(out["tile"], out["whole"])
    print(dict(sampled=(s_max, s_mean), exact=(g_max, g_mean), tile=(t_max, t_mean)))
    assert g_mean < s_mean < 0.3 * t_mean, (s_mean, g_mean, t_mean)
    assert s_max < 0.5 * t_max, (s_max, t_max)
    rows, cols = tiling.tile_borders(tiling.plan_tiles(40, 40, 12, 4), 8)
    ratio = tiling.seam_ratio(out["sampled"], rows, cols) / tiling.seam_ratio(out["whole"], rows, cols)
    print("seam ratio against untiled", ratio)
    assert abs(ratio - 1) < 0.02, ratio


# ---- the pipeline's memory options ---------------------------------------------------------------


def _count_calls(monkeypatch, module, name):
    calls = []
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_pipeline_tiles_when_asked_or_when_the_budget_needs_it(tiny_pipe, monkeypatch):
    from latent_upscaler.models import vae as vae_module

    decodes = _count_calls(monkeypatch, vae_module, "tiled_decode")
    streamed = _count_calls(monkeypatch, vae_module, "streamed_decode")
    unet_calls = _count_calls(monkeypatch, tiny_pipe.unet, "forward")

    def run(latent_side, **kwargs):
        decodes.clear(), unet_calls.clear()
        image = randn(1, 4, latent_side, latent_side, seed=20)
        return tiny_pipe(prompt="a cat", image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="np", **kwargs).images

    plain = run(40, max_memory=None)  # 640 px out
    assert decodes == [] and len(unet_calls) == 2
    assert len(streamed) == 1  # untiled, the VAE decodes outputs of 512² pixels and more in row bands
    assert (run(40) == plain).all() and decodes == []  # "auto" on this machine: room enough, one pass
    vae_tiled = run(40, vae_tile_size=256)
    assert decodes == ["tiled_decode"] and len(unet_calls) == 2
    assert vae_tiled.shape == plain.shape and 0 < abs(vae_tiled - plain).max() < 0.1
    tiled_unet = run(40, max_memory=None, tile_size=384, tile_overlap=128)  # 80² latent → 48² tiles
    assert decodes == [] and len(unet_calls) == 2 * 4
    assert 0 < abs(tiled_unet - plain).mean() < 0.1
    # a budget below what the one-pass decode needs (the streamed one would fit it: no tiles then)
    monkeypatch.setattr(tiny_pipe.vae, "stream_min_pixels", None)
    arch = memory.Architecture.of(tiny_pipe.unet, tiny_pipe.vae)
    resident = memory.resident_bytes("cpu")
    untiled = memory.estimate(arch, resident, 1, 2, (40, 40), False).peak
    tight = int(0.97 * untiled / (1 - memory.BUDGET_MARGIN))  # below what one pass needs, above tiles
    run(40, max_memory=tight)
    assert decodes == ["tiled_decode"] or len(unet_calls) > 2


def test_pipeline_budget_too_small_fails_before_any_work(tiny_pipe, monkeypatch):
    text_calls = _count_calls(monkeypatch, tiny_pipe.text_encoder, "forward")
    with pytest.raises(memory.MemoryBudgetError, match="max_memory .* too small"):
        tiny_pipe(prompt="a cat", image=randn(1, 4, 16, 16), num_inference_steps=2, max_memory="200MB")
    assert text_calls == []
    with pytest.raises(ValueError, match="max_memory 'lots' is not understood"):
        tiny_pipe(prompt="a cat", image=randn(1, 4, 16, 16), num_inference_steps=2, max_memory="lots")
    with pytest.raises(ValueError, match="tile_size must be a multiple of 64"):
        tiny_pipe(prompt="a cat", image=randn(1, 4, 16, 16), num_inference_steps=2, tile_size=100)
