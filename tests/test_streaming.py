"""The streamed VAE decode (row bands, whole-image GroupNorm statistics): the one-pass decoder's
pixels whatever the bands and the memory bound, and diffusers' at a size where the VAE streams.
Tiny models, offline."""

import pytest
import torch
import torch.nn.functional as F

import diffusers  # noqa: E402  (a test dependency: scripts/test installs it)

from latent_upscaler import memory, streaming  # noqa: E402
from latent_upscaler.models.base import no_weight_init  # noqa: E402
from latent_upscaler.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

# reference §5.1, the diffusers test's tiny VAE: decoder widths 64, 64, 32, 32
TINY = dict(block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4)
TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(block_out_channels=TINY["block_out_channels"])).eval()
    with torch.no_grad():  # weights that make every layer matter (default init nearly silences the decoder)
        for p in model.parameters():
            p.normal_(0, 0.15 if p.ndim > 1 else 0.1)
    return model


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (2, 4, 13, 21), (1, 4, 5, 3)])
@pytest.mark.parametrize("band_bytes", [1, 4096, 2**26])  # bands of MIN_BAND rows, a few rows, one band
def test_streamed_decode_is_the_one_pass_decode(vae, shape, band_bytes, monkeypatch):
    monkeypatch.setattr(streaming, "BAND_BYTES", band_bytes)
    monkeypatch.setattr(streaming, "MIN_BAND", 2 if band_bytes == 4096 else streaming.MIN_BAND)
    z = vae.post_quant_conv(randn(*shape))
    expected = vae.decoder(z)
    out = streaming.streamed_decode(vae.decoder, z)
    assert out.shape == expected.shape
    assert max_diff(out, expected) <= TOL * max(1.0, expected.abs().max().item())


@torch.no_grad()
def test_every_schedule_gives_the_same_pixels(vae, monkeypatch):
    """Kept or recomputed upsampled inputs and inner activations, chosen by the bound: all exact."""
    monkeypatch.setattr(streaming, "BAND_BYTES", 4096)
    z = vae.post_quant_conv(randn(2, 4, 12, 20))
    expected = vae.decoder(z)
    # one channel at the output resolution, batch 2: 2 · 96 · 160 · 4 bytes
    unit = 2 * 96 * 160 * 4
    seen = set()
    for bound in (0, 8 * unit, 20 * unit, 33 * unit, 50 * unit, None, 10**12):
        log = []
        out = streaming.streamed_decode(vae.decoder, z, bound, log)
        assert max_diff(out, expected) <= TOL * max(1.0, expected.abs().max().item()), bound
        seen.update(log)
    assert {u for u, _ in seen} == {"none", "kept", "recomputed"}
    assert {h for _, h in seen} == {"kept", "kept with the shortcut", "recomputed"}


@torch.no_grad()
def test_phase_kernels_are_upsample_then_conv():
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = randn(2, 6, 7, 9)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    rows = streaming.Rows.of(x, chunk=3)
    like = torch.empty(2, 1, 0, 18)
    got = streaming.upsample_rows(conv, rows.get, 14, like)
    assert max_diff(got(0, 14), expected) <= 1e-5
    assert max_diff(got(3, 8), expected[:, :, 3:8]) <= 1e-5  # odd starts: a phase's rows
    assert max_diff(got(-2, 1)[:, :, :2], torch.zeros(2, 5, 2, 18)) == 0  # outside the image: padding


def test_rows_pad_with_zeros_and_refuse_dropped_rows():
    x = randn(1, 3, 10, 4)
    rows = streaming.Rows.of(x, chunk=4)
    assert torch.equal(rows.get(2, 7), x[:, :, 2:7])
    got = rows.get(-2, 12)
    assert torch.equal(got[:, :, 2:12], x) and not got[:, :, :2].any() and not got[:, :, 12:].any()
    rows.drop_before(5)  # the first chunk, rows 0–3, goes; rows 4–7 stay
    assert rows.chunks[0] is None and torch.equal(rows.get(4, 10), x[:, :, 4:])
    with pytest.raises(RuntimeError, match="dropped"):
        rows.get(3, 6)


@torch.no_grad()
def test_group_statistics_merged_over_bands_are_the_whole_images():
    x = randn(2, 8, 11, 6) * 3 + 5  # a mean far from zero, as activations have
    stats = streaming.GroupStats(groups=4, eps=1e-6)
    for a, b in ((0, 3), (3, 4), (4, 11)):
        stats.add(x[:, :, a:b].contiguous(memory_format=torch.channels_last), disposable=a == 3)
    grouped = x.double().reshape(2, 4, -1)
    assert torch.allclose(stats.mean, grouped.mean(-1), atol=1e-9)
    assert torch.allclose(stats.m2 / stats.count, grouped.var(-1, unbiased=False), rtol=1e-6)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    scale, shift = stats.affine(norm)
    assert max_diff(x * scale + shift, norm(x)) <= 1e-5


# ---- in the VAE ------------------------------------------------------------------------------------


@torch.no_grad()
def test_vae_streams_large_outputs_with_diffusers_pixels():
    """At the default threshold (512 × 512 output pixels) our VAE streams, and its pixels are still
    diffusers' one-pass decode's."""
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**TINY).eval()
    with no_weight_init():
        ours = AutoencoderKL(VAEConfig.from_dict(dict(reference.config)))
    ours.load_weights(reference.state_dict())
    ours.eval()
    z = randn(1, 4, 64, 64, seed=3)
    assert ours.streams(z) and not ours.streams(z[:, :, :32])
    expected = reference.decode(z).sample
    assert max_diff(ours.decode(z).sample, expected) <= TOL * max(1.0, expected.abs().max().item())


def test_vae_decodes_in_one_pass_where_streaming_does_not_apply(vae, monkeypatch):
    z = randn(1, 4, 8, 8)
    calls = []
    monkeypatch.setattr("latent_upscaler.models.vae.streamed_decode", lambda *a, **k: calls.append(1))
    vae.stream_min_pixels = 1
    try:
        assert vae.streams(z.detach()) is False  # gradients on: the bands' in-place arithmetic is not for autograd
        with torch.no_grad():
            assert vae.streams(z)
            handle = vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: None)  # as CPU offload's hooks
            assert not vae.streams(z)
            vae.decode(z)
            handle.remove()
            assert not calls
            vae.stream_min_pixels = None
            assert not vae.streams(z)
    finally:
        vae.stream_min_pixels = streaming.STREAM_MIN_PIXELS


def test_memory_estimate_counts_the_streamed_decode_where_the_vae_streams(vae):
    arch = memory.Architecture(unet_width=384, vae_widths=(128, 256, 512, 512), vae_out_channels=3, itemsize=4)
    streams = memory.Architecture(**{**arch.__dict__, "stream_min_pixels": streaming.STREAM_MIN_PIXELS})
    one_pass = memory.decode_bytes(arch, 1, 1024, 1024)
    streamed = memory.decode_bytes(streams, 1, 1024, 1024)
    assert streamed - memory.DECODE_BASE == int(memory.STREAM_LIVE * 1024 * 1024 * 128 * 4)
    assert one_pass - memory.DECODE_BASE == int(memory.DECODE_LIVE * 1024 * 1024 * 128 * 4)
    assert memory.decode_bytes(streams, 1, 256, 256) == memory.decode_bytes(arch, 1, 256, 256)  # below the threshold
    assert not streaming.hooked(vae.decoder)
    handle = vae.decoder.mid_block.register_forward_hook(lambda m, a, o: None)
    assert streaming.hooked(vae.decoder)
    handle.remove()


@torch.no_grad()
def test_half_precision_bands_round_like_the_one_pass_decode(vae):
    """In bfloat16 the bands are normalised in float32 and rounded once, as torch's GroupNorm does:
    as close to the float32 decode as the one-pass bfloat16 decode is."""
    z = vae.post_quant_conv(randn(1, 4, 24, 24))
    reference = vae.decoder(z)
    half = AutoencoderKL(VAEConfig(block_out_channels=TINY["block_out_channels"])).eval()
    half.load_state_dict(vae.state_dict())
    half.to(torch.bfloat16)
    one_pass = half.decoder(z.bfloat16()).float()
    streamed = streaming.streamed_decode(half.decoder, z.bfloat16()).float()
    assert streamed.dtype == torch.float32 and max_diff(one_pass, reference) > 1e-3  # bfloat16 does round
    err_one, err_streamed = (one_pass - reference).abs(), (streamed - reference).abs()
    assert err_streamed.mean() <= 1.25 * err_one.mean()
    assert err_streamed.max() <= 1.5 * err_one.max()
