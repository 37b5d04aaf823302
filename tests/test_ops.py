"""The memory-traffic savings of ``models/ops.py`` change no result: packed and layout-matched
convolutions, in-place residual sums and activations equal torch's plain ones bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latent_upscaler.models.ops import Conv2d, activation_, add_into, packed_convolutions, runs_channels_last


def _layouts(batch: int):
    x = torch.randn(batch, 64, 8, 8)
    tokens = torch.randn(batch, 64, 64)  # (B, HW, C) as an attention block hands them back
    return {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "attention_view": tokens.permute(0, 2, 1).reshape(batch, 64, 8, 8),  # size-1 batch: odd strides
    }


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "attention_view"])
def test_runs_channels_last_is_torchs_choice(batch, layout):
    x = _layouts(batch)[layout]
    out = F.conv2d(x, torch.randn(32, 64, 3, 3), padding=1)  # a plain NCHW weight: the input decides
    assert runs_channels_last(x) == (out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "attention_view"])
def test_conv2d_equals_torch_with_and_without_packing(dtype, batch, layout):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(64, 32, 3, padding=1).to(dtype)
    ours = Conv2d(64, 32, 3, padding=1).to(dtype)
    ours.load_state_dict(reference.state_dict())
    x = _layouts(batch)[layout].to(dtype)
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(ours(x), expected)  # the weight now has the input's layout
        with packed_convolutions({}) as cache:
            assert torch.equal(ours(x), expected)
            assert torch.equal(ours(x), expected)  # from the cache
    assert torch.equal(ours.weight, reference.weight)
    assert ours.weight.is_contiguous(memory_format=torch.channels_last) == runs_channels_last(x)
    if runs_channels_last(x) and batch == 2:
        assert len(cache) == 1, "channels-last oneDNN convolutions are packed"


def test_packing_leaves_gradients_alone():
    conv = Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    with packed_convolutions({}) as cache:
        conv(x).sum().backward()
    assert not cache and x.grad is not None


@pytest.mark.parametrize("batch", [1, 2])
def test_add_into_gives_the_sum_torch_gives(batch):
    views = _layouts(batch)
    for first_name, first in views.items():
        for second_name, second in views.items():
            expected = first + second
            fresh = first.clone(memory_format=torch.preserve_format)
            got = add_into(fresh, second)
            assert torch.equal(got, expected) and got.stride() == expected.stride(), (first_name, second_name)


def test_in_place_activation_equals_the_module():
    x = torch.randn(2, 64, 8, 8)
    for name, module in (("gelu", torch.nn.GELU()), ("silu", torch.nn.SiLU())):
        assert torch.equal(activation_(name)(x.clone()), module(x))


def test_conditioning_reuses_text_keys_values_until_the_states_change():
    from test_unet import TINY_CONFIG, _inputs, _pair

    from latent_upscaler.conditioning import UpscalerConditioning

    _, unet = _pair(TINY_CONFIG)
    sample, timestep, states, cond = _inputs(TINY_CONFIG, 2, 16, 16)
    noisy, low_res = sample[:, :4], sample[:, 4:].contiguous()
    conditioning = UpscalerConditioning(unet)
    with torch.no_grad():
        def run():
            return conditioning(noisy, timestep, low_res_cond=low_res, encoder_hidden_states=states, timestep_cond=cond)

        def direct():
            return unet(sample, timestep, states, timestep_cond=cond)[:, :-1]

        assert torch.equal(run(), direct())
        first = conditioning._text
        assert torch.equal(run(), direct()) and conditioning._text is first  # reused
        states.mul_(0.5)  # a callback may change the prompt embeddings in place
        assert torch.equal(run(), direct()) and conditioning._text is not first
    conditioning.release()
    assert conditioning._text is None and not conditioning._packed
