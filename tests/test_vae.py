"""AutoencoderKL: parity with diffusers on identical weights, legacy keys, config, seeded noise."""

import pytest
import torch
from hub_configs import HUB_VAE as HUB_CONFIG

import diffusers  # noqa: E402  (a test dependency: scripts/test installs it)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from latent_upscaler.configuration import ConfigError  # noqa: E402
from latent_upscaler.models.base import WeightsMismatchError, no_weight_init  # noqa: E402
from latent_upscaler.models.vae import AutoencoderKL, DiagonalGaussianDistribution, VAEConfig  # noqa: E402
from latent_upscaler.randomness import randn  # noqa: E402

# reference §5.1, the diffusers test's tiny VAE
TINY = dict(
    block_out_channels=[32, 32, 64, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
)


def ours_from(reference) -> AutoencoderKL:
    with no_weight_init():
        model = AutoencoderKL(VAEConfig.from_dict(dict(reference.config)))
    model.load_weights(reference.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**TINY).eval()
    return reference, ours_from(reference)


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL.from_config(HUB_CONFIG).eval()
    return reference, ours_from(reference)


def pixels(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(*shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- (a) tiny parity --------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 32, 48)])
def test_tiny_encode_matches(tiny, shape):
    reference, ours = tiny
    x = pixels(*shape)
    want, got = reference.encode(x).latent_dist, ours.encode(x).latent_dist
    assert got.mean.shape == (shape[0], 4, shape[2] // 8, shape[3] // 8)
    for name in ("mean", "logvar", "std", "var"):
        assert max_diff(getattr(got, name), getattr(want, name)) <= 1e-5, name
    assert max_diff(got.mode(), want.mode()) <= 1e-5

    want_z = want.sample(torch.Generator().manual_seed(7))
    assert max_diff(got.sample(torch.Generator().manual_seed(7)), want_z) <= 1e-5
    seeds = [11, 12][: shape[0]]
    want_z = want.sample([torch.Generator().manual_seed(s) for s in seeds])
    got_z = got.sample([torch.Generator().manual_seed(s) for s in seeds])
    assert max_diff(got_z, want_z) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 4, 8, 12)])
def test_tiny_decode_matches(tiny, shape):
    reference, ours = tiny
    z = latents(*shape)
    got = ours.decode(z).sample
    assert got.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert max_diff(got, reference.decode(z).sample) <= 1e-5


@torch.no_grad()
def test_tiny_output_forms_and_forward(tiny):
    reference, ours = tiny
    x, z = pixels(1, 3, 32, 32), latents(1, 4, 4, 4)
    (posterior,) = ours.encode(x, return_dict=False)
    assert isinstance(posterior, DiagonalGaussianDistribution)
    assert ours.encode(x)[0].mean.shape == posterior.mean.shape
    (sample,) = ours.decode(z, return_dict=False)
    assert torch.equal(sample, ours.decode(z)[0])
    assert max_diff(ours(x).sample, reference(x).sample) <= 1e-5
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    want = reference(x, sample_posterior=True, generator=g()).sample
    assert max_diff(ours(x, sample_posterior=True, generator=g()).sample, want) <= 1e-5


def test_posterior_clamps_logvar_as_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Reference

    logvar = torch.tensor([-100.0, -5.0, 5.0, 100.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    params = torch.cat([torch.randn(1, 4, 2, 2), logvar], 1)
    ours, want = DiagonalGaussianDistribution(params), Reference(params)
    assert ours.logvar.min() == -30 and ours.logvar.max() == 20
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(want, name)), name


def test_wrong_channels_teach(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match=r"expected \(batch, 4, height, width\)"):
        ours.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"pixels in \[-1, 1\]"):
        ours.encode(torch.zeros(1, 4, 8, 8))


# -- (b) full-size hub architecture, random weights -------------------------------------------------


@pytest.mark.slow
@torch.no_grad()
def test_full_decode_matches(full):
    reference, ours = full
    z = latents(1, 4, 8, 8)
    want = reference.decode(z).sample
    assert max_diff(ours.decode(z).sample, want) <= 1e-4 * want.abs().max().item()


@pytest.mark.slow
@torch.no_grad()
def test_full_encode_matches(full):
    reference, ours = full
    x = pixels(1, 3, 64, 64)
    want, got = reference.encode(x).latent_dist, ours.encode(x).latent_dist
    for name in ("mean", "logvar"):
        scale = getattr(want, name).abs().max().item()
        assert max_diff(getattr(got, name), getattr(want, name)) <= 1e-4 * scale, name


# -- (c) keys and shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", pytest.param("full", marks=pytest.mark.slow)])
def test_state_dict_keys_and_shapes_equal_diffusers(which, request):
    reference, ours = request.getfixturevalue(which)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert list(got) == list(want)  # same order, so printed diffs line up


def test_no_mid_attention_or_quant_convs_match_diffusers():
    options = dict(TINY, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**options).eval()
    ours = ours_from(reference)
    assert not any("attentions" in k or "quant_conv" in k for k in ours.state_dict())
    x = pixels(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x).sample, reference(x).sample) <= 1e-5


# -- (d) legacy attention keys ----------------------------------------------------------------------

NEW_TO_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def legacy_form(state_dict):
    """Rewrite into the diffusers ≤ 0.13 layout; the encoder's weights as 1×1-conv shapes."""
    out = {}
    for key, tensor in state_dict.items():
        for new, old in NEW_TO_LEGACY.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.startswith("encoder.") and key.endswith(".weight"):
                    tensor = tensor[:, :, None, None]
        out[key] = tensor
    return out


@torch.no_grad()
def test_legacy_state_dict_loads_and_matches(tiny):
    reference, ours = tiny
    legacy = legacy_form(reference.state_dict())
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert legacy["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    assert not any(".to_q." in k for k in legacy)

    converted = AutoencoderKL.convert_state_dict(dict(legacy))
    assert converted.keys() == reference.state_dict().keys()
    # diffusers' own renaming of deprecated attention blocks agrees on the names
    assert set(reference._fix_state_dict_keys_on_load(dict(legacy))) == set(converted)
    assert AutoencoderKL.convert_state_dict(reference.state_dict()).keys() == reference.state_dict().keys()

    with no_weight_init():
        loaded = AutoencoderKL(ours.config)
    loaded.load_weights(legacy)
    loaded.eval()
    x, z = pixels(1, 3, 32, 32), latents(1, 4, 4, 4)
    assert torch.equal(loaded.encode(x).latent_dist.mean, ours.encode(x).latent_dist.mean)
    assert torch.equal(loaded.decode(z).sample, ours.decode(z).sample)


def test_mismatched_state_dict_is_refused(tiny):
    _, ours = tiny
    state_dict = dict(ours.state_dict())
    del state_dict["quant_conv.bias"]
    with pytest.raises(WeightsMismatchError, match="quant_conv.bias"):
        AutoencoderKL(ours.config).load_weights(state_dict)


# -- (e) config -------------------------------------------------------------------------------------


def test_config_defaults_are_the_hub_config():
    assert VAEConfig() == VAEConfig.from_dict(HUB_CONFIG)


def test_config_from_diffusers_and_back(tiny):
    reference, ours = tiny
    assert ours.config.block_out_channels == [32, 32, 64, 64] and ours.config.layers_per_block == 1
    for config in (ours.config, VAEConfig.from_dict(HUB_CONFIG)):
        rebuilt = diffusers.AutoencoderKL.from_config(config.to_dict())
        assert {k: v for k, v in rebuilt.config.items() if not k.startswith("_")} == {
            k: v for k, v in config.to_dict().items() if not k.startswith("_")
        }
        with no_weight_init():
            shapes = {k: v.shape for k, v in AutoencoderKL(config).state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize(
    "change, field",
    [
        ({"down_block_types": ["DownBlock2D"] * 4}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"] * 2}, "up_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
        ({"act_fn": "tanh"}, "act_fn"),
        ({"norm_num_groups": 24}, "norm_num_groups"),
        ({"num_vq_embeddings": 256}, "num_vq_embeddings"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        VAEConfig.from_dict({**HUB_CONFIG, **change})


# -- (f) randomness ---------------------------------------------------------------------------------


def test_randn_equals_diffusers_randn_tensor():
    shape = (2, 4, 5, 6)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    assert torch.equal(randn(shape, gens(0)[0]), randn_tensor(shape, generator=gens(0)[0]))
    assert torch.equal(randn(shape, gens(1, 2)), randn_tensor(shape, generator=gens(1, 2)))
    assert torch.equal(randn(shape, gens(3)), randn_tensor(shape, generator=gens(3)))  # list of 1 = single
    half = randn(shape, gens(4)[0], device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, randn_tensor(shape, generator=gens(4)[0], device=torch.device("cpu"), dtype=torch.float16))
    torch.manual_seed(5)
    global_rng = randn(shape)
    torch.manual_seed(5)
    assert torch.equal(global_rng, randn_tensor(shape))
    # a generator per image: an image's noise does not depend on its batch
    assert torch.equal(randn(shape, gens(1, 2))[1:], randn((1,) + shape[1:], gens(2)))


def test_randn_generator_list_must_match_batch():
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        randn((2, 4, 8, 8), [torch.Generator().manual_seed(s) for s in range(3)])
