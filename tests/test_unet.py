"""The K-UNet against diffusers' UNet2DConditionModel on identical weights, and its config parsing."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import pytest
import torch

import diffusers  # noqa: E402  (a test dependency: scripts/test installs it)
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.downsampling import KDownsample2D  # noqa: E402
from diffusers.models.upsampling import KUpsample2D  # noqa: E402

from latent_upscaler.configuration import ConfigError  # noqa: E402
from latent_upscaler.models.base import no_weight_init  # noqa: E402
from latent_upscaler.models.layers import KDownsample, KUpsample  # noqa: E402
from latent_upscaler.models.unet import KUNet, UNetConfig  # noqa: E402
from hub_configs import HUB_UNET as HUB_CONFIG  # noqa: E402


# reference §5.1: the tiny UNet of diffusers' pipeline tests
TINY_CONFIG = dict(
    act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=[32, 32, 64, 64],
    time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
    down_block_types=["KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"],
    in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
    resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
    up_block_types=["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"],
)

TOL = 1e-5


def _pair(config: dict):
    """diffusers' model (seed 0) and ours with its weights, both in eval mode."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(config).eval()
    with no_weight_init():
        ours = KUNet(UNetConfig.from_dict(ref.config)).eval()
    ours.load_weights(ref.state_dict(), source="diffusers state_dict")
    return ref, ours


def _inputs(config: dict, batch: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], height, width, generator=g)
    context = torch.randn(batch, 77, config["cross_attention_dim"], generator=g)
    cond_dim = config.get("time_cond_proj_dim")
    cond = None if cond_dim is None else torch.randn(batch, cond_dim, generator=g)
    timestep = torch.tensor(math.log(2.5) / 4)  # c_noise = ln(sigma) / 4, 0-d, float32
    return sample, timestep, context, cond


@torch.no_grad()
def _max_diff(ref, ours, sample, timestep, context, cond, mask=None) -> float:
    expected = ref(sample, timestep, context, timestep_cond=cond, encoder_attention_mask=mask).sample
    actual = ours(sample, timestep, context, timestep_cond=cond, encoder_attention_mask=mask)
    assert actual.shape == expected.shape == (sample.shape[0], ref.config.out_channels, *sample.shape[2:])
    return (actual - expected).abs().max().item()


@pytest.fixture(scope="module")
def tiny():
    return _pair(TINY_CONFIG)


@pytest.fixture(scope="module")
def hub():
    return _pair(HUB_CONFIG)


# ------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("batch,height,width", [(2, 32, 32), (2, 16, 24), (1, 32, 32)])
def test_tiny_matches_diffusers(tiny, batch, height, width):
    ref, ours = tiny
    assert _max_diff(ref, ours, *_inputs(TINY_CONFIG, batch, height, width)) <= TOL


def test_tiny_matches_diffusers_with_per_sample_timesteps(tiny):
    ref, ours = tiny
    sample, _, context, cond = _inputs(TINY_CONFIG, 2, 32, 32, seed=1)
    timestep = torch.log(torch.tensor([0.03, 14.6])) / 4
    assert _max_diff(ref, ours, sample, timestep, context, cond) <= TOL


def test_other_config_values_match_diffusers():
    """Every field the model reads, off its hub value: per-block lists (attention_head_dim is read
    unreversed by up blocks), output GroupNorm, 3×3 in/out convs, centring, [sin, cos], SiLU, no
    post-activation and no timestep condition."""
    config = dict(
        TINY_CONFIG, layers_per_block=[1, 2, 2, 1], attention_head_dim=[8, 16, 8, 16], act_fn="silu",
        timestep_post_act=None, time_cond_proj_dim=None, norm_num_groups=8, norm_eps=1e-6, conv_in_kernel=3,
        conv_out_kernel=3, center_input_sample=True, flip_sin_to_cos=False,
    )
    ref, ours = _pair(config)
    assert [len(b.resnets) for b in ours.up_blocks] == [1, 2, 2, 1]
    assert _max_diff(ref, ours, *_inputs(config, 2, 16, 16)) <= TOL


@pytest.mark.slow
def test_hub_architecture_matches_diffusers(hub):
    ref, ours = hub
    assert _max_diff(ref, ours, *_inputs(HUB_CONFIG, 2, 16, 16)) <= TOL


def test_bfloat16_matches_diffusers(tiny):
    """Fourier features in float32 from a float32 timestep, then cast to the model dtype."""
    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in tiny)
    sample, timestep, context, cond = _inputs(TINY_CONFIG, 2, 16, 16)
    sample, context, cond = (t.to(torch.bfloat16) for t in (sample, context, cond))
    assert _max_diff(ref, ours, sample, timestep, context, cond) <= 1e-3  # bf16 features: 1.6e-2


# ------------------------------------------------------------------------------------------------
# encoder attention mask


def test_all_true_mask_equals_no_mask(tiny):
    _, ours = tiny
    sample, timestep, context, cond = _inputs(TINY_CONFIG, 2, 16, 16)
    mask = torch.ones(2, 77, dtype=torch.bool)
    with torch.no_grad():
        unmasked = ours(sample, timestep, context, cond)
        masked = ours(sample, timestep, context, cond, encoder_attention_mask=mask)
    assert (masked - unmasked).abs().max().item() <= 1e-6


def test_padding_mask_matches_diffusers(tiny):
    ref, ours = tiny
    sample, timestep, context, cond = _inputs(TINY_CONFIG, 2, 16, 16)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[0, :5] = mask[1, :40] = True  # prompts of 5 and 40 tokens, then padding
    assert _max_diff(ref, ours, sample, timestep, context, cond, mask=mask) <= TOL
    with torch.no_grad():
        masked = ours(sample, timestep, context, cond, encoder_attention_mask=mask)
        unmasked = ours(sample, timestep, context, cond)
        additive = ours(sample, timestep, context, cond, encoder_attention_mask=(~mask).float() * -10000.0)
    assert (masked - unmasked).abs().max().item() > 1e-3  # the mask does something
    assert torch.equal(masked, additive)


# ------------------------------------------------------------------------------------------------
# weights and resamplers


@pytest.mark.parametrize("which", ["tiny", "hub"])
def test_state_dict_equals_diffusers(which, request):
    ref, ours = request.getfixturevalue(which)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert actual == expected
    if which == "hub":
        assert len(actual) == 639 and sum(p.numel() for p in ours.parameters()) == 372_560_645
    kernels = {name: b for name, b in ours.named_buffers() if name.endswith("kernel")}
    assert len(kernels) == 6 and not any("kernel" in k for k in actual)
    for name, kernel in kernels.items():  # depthwise: one 4×4 filter per channel, never C×C
        assert kernel.shape[1:] == (1, 4, 4), name


@pytest.mark.parametrize("height,width", [(16, 12), (5, 7)])
def test_depthwise_resamplers_match_diffusers(height, width):
    torch.manual_seed(0)
    x = torch.randn(2, 48, height, width)
    down, up = KDownsample(48)(x), KUpsample(48)(x)
    assert down.shape == (2, 48, height // 2, width // 2) and up.shape == (2, 48, 2 * height, 2 * width)
    assert (down - KDownsample2D()(x)).abs().max().item() <= 1e-6
    assert (up - KUpsample2D()(x)).abs().max().item() <= 1e-6


def test_sample_size_errors_teach(tiny):
    _, ours = tiny
    _, timestep, context, cond = _inputs(TINY_CONFIG, 1, 16, 16)
    for shape, message in [((1, 8, 20, 16), "multiples of 8"), ((1, 8, 8, 8), "at least 16"),
                           ((1, 4, 16, 16), "expected")]:
        with pytest.raises(ValueError, match=message):
            ours(torch.zeros(shape), timestep, context, cond)


# ------------------------------------------------------------------------------------------------
# config


def test_every_diffusers_parameter_is_classified():
    params = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    assert params == fields | set(UNetConfig.NEUTRAL) | set(UNetConfig.IGNORED)


def test_configs_written_by_diffusers_parse(tiny, hub):
    assert UNetConfig.from_dict(HUB_CONFIG) == UNetConfig()
    assert UNetConfig.from_dict(dict(hub[0].config)) == UNetConfig()
    tiny_config = UNetConfig.from_dict(dict(tiny[0].config))  # all 48 fields, tuples included
    assert tiny_config.block_out_channels == [32, 32, 64, 64] and tiny_config.layers_per_block == 2
    harmless = dict(TINY_CONFIG, only_cross_attention=[False] * 4, attention_head_dim=[8] * 4,
                    transformer_layers_per_block=[1] * 4, cross_attention_dim=[32] * 4)
    config = UNetConfig.from_dict(UNet2DConditionModel.from_config(harmless).config)
    assert KUNet(config).state_dict().keys() == tiny[1].state_dict().keys()


@pytest.mark.parametrize("which", ["hub", "tiny"])
def test_to_dict_builds_the_same_diffusers_model(which, request):
    config = request.getfixturevalue(which)[1].config
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config.to_dict())
        ours = KUNet(config)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert UNetConfig.from_dict(dict(ref.config)) == config


@pytest.mark.parametrize(
    "change,field",
    [
        ({"down_block_types": ["KDownBlock2D", "CrossAttnDownBlock2D", "KCrossAttnDownBlock2D",
                               "KCrossAttnDownBlock2D"]}, "down_block_types"),
        ({"flux_capacitor": 1}, "flux_capacitor"),
        ({"time_embedding_type": "positional"}, "time_embedding_type"),
        ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type"),
        ({"act_fn": "tanh"}, "act_fn"),
        ({"block_out_channels": [32, 32, 64]}, "down_block_types"),
        ({"block_out_channels": [16, 16, 32, 32]}, "block_out_channels"),
        ({"cross_attention_dim": [32, 32, 64, 64]}, "cross_attention_dim"),
        ({"up_block_types": ["KUpBlock2D"] * 4}, "up_block_types"),  # deepest skip is None in diffusers
        ({"attention_head_dim": 128}, "attention_head_dim"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=repr(field)):
        UNetConfig.from_dict(dict(TINY_CONFIG, **change))


def test_legacy_timestep_act_2_is_read_as_timestep_post_act(tiny):
    ref, ours = tiny
    legacy = {k: v for k, v in ref.config.items() if k != "timestep_post_act"}
    legacy["timestep_act_2"] = "gelu"
    with pytest.warns(UserWarning, match="timestep_act_2"):
        config = UNetConfig.from_dict(legacy)
    assert config == ours.config
    model = KUNet(config).eval()
    model.load_weights(ref.state_dict())
    assert _max_diff(ref, model, *_inputs(TINY_CONFIG, 1, 16, 16)) <= TOL
    with pytest.raises(ConfigError, match="timestep_act_2"):
        UNetConfig.from_dict(dict(legacy, timestep_post_act="silu"))
