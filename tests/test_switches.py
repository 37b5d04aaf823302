"""diffusers' memory and speed switches: each against the plain pipeline on the tiny folder.

Slicing and offload must leave outputs unchanged (≤ 1e-5); FreeU must change them, and turning it
off must restore them bit for bit; xformers must fail clearly where it cannot run.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, floats_tensor, generator, max_diff

from latent_upscaler import StableDiffusionLatentUpscalePipeline
from latent_upscaler.models import layers
from latent_upscaler.models.unet import KUNet, UNetConfig
from latent_upscaler.switches import PipelineSwitches, execution_device

TOL = 1e-5
LATENTS = floats_tensor((1, 4, 8, 8))
PIXELS = floats_tensor((2, 3, 32, 32), seed=1) * 2 - 1

Pipeline = StableDiffusionLatentUpscalePipeline
assert issubclass(Pipeline, PipelineSwitches)


@pytest.fixture
def pipe(tiny_folder):
    """A fresh pipeline with the switches (they change its models)."""
    p = Pipeline.from_pretrained(tiny_folder)
    p.set_progress_bar_config(disable=True)
    return p


def upscale(p, image=LATENTS, output_type="latent", **kwargs):
    return p(prompt=PROMPT, image=image, num_inference_steps=2, output_type=output_type,
             generator=generator(0), **kwargs).images


@pytest.fixture(scope="module")
def plain(tiny_pipe):
    """Outputs of the unswitched pipeline: latents, decoded pixels, and pixels of an RGB batch."""
    return {
        "latent": upscale(tiny_pipe),
        "np": upscale(tiny_pipe, output_type="np"),
        "rgb": upscale(tiny_pipe, image=PIXELS, output_type="np"),
    }


def attention_slices(unet):
    return [layer.slice_size for _, layer in layers.attention_layers(unet)]


# ---- attention slicing ----


@pytest.mark.parametrize("slice_size", ["auto", "max", 1, 2, 4])
def test_attention_slicing_keeps_output(pipe, plain, slice_size):
    pipe.enable_attention_slicing(slice_size)
    assert all(s is not None for s in attention_slices(pipe.unet))
    assert max_diff(upscale(pipe), plain["latent"]) <= TOL
    pipe.disable_attention_slicing()
    assert attention_slices(pipe.unet) == [None] * len(attention_slices(pipe.unet))
    assert torch.equal(upscale(pipe), plain["latent"])


def test_attention_slicing_sizes(pipe):
    heads = [layer.heads for _, layer in layers.attention_layers(pipe.unet)]
    assert sorted(set(heads)) == [4, 8]  # tiny UNet: 32 and 64 channels, head size 8
    pipe.enable_attention_slicing()  # "auto": half of each layer's heads
    assert attention_slices(pipe.unet) == [h // 2 for h in heads]
    pipe.enable_attention_slicing("max")
    assert set(attention_slices(pipe.unet)) == {1}
    pipe.enable_attention_slicing(3)
    assert set(attention_slices(pipe.unet)) == {3}
    # the VAE's attention is not sliced, as in diffusers
    assert [layer.slice_size for _, layer in layers.attention_layers(pipe.vae)] == [None, None]  # encoder, decoder


@pytest.mark.parametrize("bad", [5, 0, -1, 2.5, True, "half"])
def test_attention_slicing_refuses(pipe, bad):
    with pytest.raises(ValueError, match="slice_size") as info:
        pipe.enable_attention_slicing(bad)
    if bad == 5:
        assert "4 heads" in str(info.value) and "from 1 to 4" in str(info.value)
    assert attention_slices(pipe.unet) == [None] * len(attention_slices(pipe.unet))  # nothing half-set


def test_attention_slicing_full_size_limits():
    with torch.device("meta"):
        unet = KUNet(UNetConfig())  # the hub architecture, no real weights
    heads = [layer.heads for _, layer in layers.attention_layers(unet)]
    assert sorted(set(heads)) == [6, 12]
    for size in (1, 6):
        unet.set_attention_slice(size)
        assert set(attention_slices(unet)) == {size}
    with pytest.raises(ValueError, match="more than the 6 heads of .*from 1 to 6"):
        unet.set_attention_slice(7)
    unet.set_attention_slice("auto")
    assert attention_slices(unet) == [h // 2 for h in heads]


def test_sliced_attention_with_mask_matches_sdpa():
    torch.manual_seed(0)
    attn = layers.Attention(16, heads=4, head_dim=4, context_dim=8).eval()
    x, context = torch.randn(2, 10, 16), torch.randn(2, 7, 8)
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    expected = attn(x, context, mask)
    for size in (1, 3):
        attn.set_attention_slice(size)
        assert max_diff(attn(x, context, mask), expected) <= 1e-6


# ---- xformers ----


def test_xformers_missing_says_how_to_install(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install xformers"):
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_xformers_memory_efficient_attention()  # turning it off needs nothing


def _fake_xformers(monkeypatch):
    """An ``xformers.ops`` whose memory_efficient_attention is SDPA in xformers' BMHK layout."""

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
        assert attn_bias is None or attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        assert attn_bias is None or attn_bias.stride(-2) % 8 == 0  # rows 8-aligned in memory
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return out.transpose(1, 2)

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_without_gpu_says_so(pipe, monkeypatch):
    _fake_xformers(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="only on CUDA GPUs"):
        pipe.enable_xformers_memory_efficient_attention()
    assert not any(layer.use_xformers for _, layer in layers.attention_layers(pipe.unet))


def test_xformers_layout_and_mask(monkeypatch):
    _fake_xformers(monkeypatch)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 77, 4), torch.randn(2, 3, 77, 4)
    bias = layers.attention_bias(torch.rand(2, 77) > 0.3, q.dtype)  # (B, 1, 1, T): needs broadcasting
    for b in (None, bias):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=b)
        assert max_diff(layers.xformers_attention(q, k, v, b), expected) <= 1e-6


def test_xformers_attention_refuses_cpu_tensors():
    attn = layers.Attention(8, heads=2, head_dim=4)
    attn.set_use_memory_efficient_attention_xformers(True)
    with pytest.raises(RuntimeError, match="only on CUDA GPUs"):
        attn(torch.randn(1, 4, 8))


# ---- VAE slicing and tiling ----


def test_vae_slicing_keeps_output(pipe, plain):
    pipe.enable_vae_slicing()
    assert max_diff(upscale(pipe, image=PIXELS, output_type="np"), plain["rgb"]) <= TOL
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing


def test_vae_slicing_runs_one_image_at_a_time(pipe):
    batches = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    z = torch.randn(3, 4, 4, 4)
    expected = pipe.vae.decode(z).sample
    pipe.vae.enable_slicing()
    assert max_diff(pipe.vae.decode(z).sample, expected) <= TOL
    assert batches == [3, 1, 1, 1]


def test_vae_tiling_decodes_in_tiles_and_disabling_restores_exactly(pipe):
    z = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(3))
    expected = pipe.vae.decode(z).sample
    pipe.enable_vae_tiling()
    pipe.vae.enable_tiling(16, 8)  # tiles of the tiny VAE's scale
    tiled = pipe.vae.decode(z).sample
    pipe.disable_vae_tiling()
    assert tiled.shape == expected.shape and max_diff(tiled, expected) > 0  # it did tile …
    assert (tiled - expected).abs().mean() < 0.3 * expected.abs().mean()  # … and stayed near (test_tiling: accuracy)
    assert torch.equal(pipe.vae.decode(z).sample, expected)


# ---- FreeU ----


def test_freeu_changes_output_and_disabling_restores_it(pipe, plain):
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert [block.freeu for block in pipe.unet.up_blocks] == [None, (1.2, 0.9), (1.4, 0.2), None]
    assert max_diff(upscale(pipe), plain["latent"]) > 1e-3
    pipe.disable_freeu()
    assert torch.equal(upscale(pipe), plain["latent"])


def test_freeu_neutral_factors_change_nothing():
    h, skip = torch.randn(1, 6, 8, 8), torch.randn(1, 4, 16, 16)
    out_h, out_skip = layers.freeu(h, skip, 1.0, 1.0)
    assert torch.equal(out_h, h) and max_diff(out_skip, skip) <= 1e-6  # the FFT round trip rounds


def test_freeu_matches_diffusers_apply_freeu():
    from diffusers.utils.torch_utils import apply_freeu

    torch.manual_seed(0)
    h, skip = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    factors = {"s1": 0.9, "s2": 0.2, "b1": 1.2, "b2": 1.4}
    for stage, (b, s) in enumerate(((1.2, 0.9), (1.4, 0.2))):
        expected = apply_freeu(stage, h.clone(), skip.clone(), **factors)
        actual = layers.freeu(h, skip, b, s)
        assert torch.equal(actual[0], expected[0]) and max_diff(actual[1], expected[1]) <= 1e-6


def test_freeu_refuses_non_numbers(pipe):
    with pytest.raises(TypeError, match="b1"):
        pipe.enable_freeu(0.9, 0.2, "1.2", 1.4)


# ---- CPU offload ----


def params_on(model):
    return {p.device.type for p in model.parameters()}


def test_execution_device_rules():
    assert execution_device(None, "cpu") == torch.device("cpu")
    assert execution_device(1, "cuda") == torch.device("cuda", 1)
    assert execution_device(None, "cuda") == torch.device("cuda", 0)
    assert execution_device(None, "cuda:2") == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="not both"):
        execution_device(1, "cuda:1")
    with pytest.raises(ValueError, match="no index"):
        execution_device(0, "cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert execution_device() == torch.device("cpu")


def test_sequential_cpu_offload(pipe, plain):
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu")
    seen = []

    def callback(step, timestep, latents):  # between UNet forwards
        seen.append({name: params_on(getattr(pipe, name)) for name in ("text_encoder", "unet", "vae")})

    out = upscale(pipe, output_type="np", callback=callback)
    assert seen and all(s == {"text_encoder": {"meta"}, "unet": {"meta"}, "vae": {"meta"}} for s in seen)
    assert max_diff(out, plain["np"]) <= TOL  # so the weights were real while each module ran
    assert max_diff(upscale(pipe, image=PIXELS, output_type="np"), plain["rgb"]) <= TOL
    pipe.remove_all_hooks()
    assert params_on(pipe.unet) == params_on(pipe.vae) == params_on(pipe.text_encoder) == {"cpu"}
    assert max_diff(upscale(pipe, output_type="np"), plain["np"]) <= TOL


def test_model_cpu_offload(pipe, plain):
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu")
    assert params_on(pipe.unet) == params_on(pipe.vae) == params_on(pipe.text_encoder) == {"meta"}
    seen = []

    def record(step=None, timestep=None, latents=None):
        seen.append({name: params_on(getattr(pipe, name)) for name in ("text_encoder", "unet", "vae")})

    pipe.vae.encoder.register_forward_pre_hook(lambda module, args: record())  # after ours: VAE loaded
    out = upscale(pipe, image=PIXELS, output_type="np", callback=record)
    at_encode, in_loop = seen[0], seen[1:]
    assert at_encode == {"text_encoder": {"meta"}, "unet": {"meta"}, "vae": {"cpu"}}
    assert in_loop and all(s == {"text_encoder": {"meta"}, "unet": {"cpu"}, "vae": {"meta"}} for s in in_loop)
    assert max_diff(out, plain["rgb"]) <= TOL
    # the call ends with maybe_free_model_hooks(), as diffusers' does: nothing stays loaded
    assert params_on(pipe.unet) == params_on(pipe.vae) == params_on(pipe.text_encoder) == {"meta"}
    assert max_diff(upscale(pipe, output_type="np"), plain["np"]) <= TOL  # hooks still armed
    pipe.remove_all_hooks()
    assert params_on(pipe.unet) == params_on(pipe.vae) == params_on(pipe.text_encoder) == {"cpu"}
    assert max_diff(upscale(pipe, output_type="np"), plain["np"]) <= TOL


def test_offload_modes_replace_each_other(pipe, plain):
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert max_diff(upscale(pipe), plain["latent"]) <= TOL
    pipe.enable_model_cpu_offload(device="cpu")
    assert max_diff(upscale(pipe), plain["latent"]) <= TOL
