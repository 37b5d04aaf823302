"""The original k-diffusion checkpoint: a tiny ImageDenoiserModelV1 built by k-diffusion itself,
saved as the release saves it, loads into our K-UNet with equal outputs; the shipped config of the
real model maps to the hub's UNet config; mismatches and unsupported configs are named."""

from __future__ import annotations

import copy
import json
import math
import pathlib
import re

import pytest
import torch
from conftest import max_diff
from diffusers import UNet2DConditionModel  # before k-diffusion: kdiffusion_ref's torchvision stand-in has no __spec__
from hub_configs import HUB_UNET as HUB_UNET_CONFIG
from kdiffusion_ref import import_k_diffusion

from latent_upscaler.configuration import ConfigError
from latent_upscaler.loading.original import (
    NOISE_EMBED,
    ORIGINAL_CONFIG,
    OriginalModelConfig,
    convert_original_state_dict,
    load_original_unet,
    original_layout,
    read_checkpoint,
)
from latent_upscaler.loading.weights import save_model
from latent_upscaler.models.base import WeightsMismatchError, no_weight_init
from latent_upscaler.models.unet import KUNet, UNetConfig

# Representable by diffusers' K blocks (attention widths are multiples of the 64-channel heads, and
# the deepest widths equal mapping_out, which makes diffusers' first up block the self-attention one).
# Unequal depths catch off-by-one module indices.
TINY = {
    "type": "image_v1", "input_channels": 4, "input_size": [16, 16], "patch_size": 1, "mapping_out": 128,
    "mapping_cond_dim": 160,  # 128 noise-augmentation features + 32-wide pooled text
    "unet_cond_dim": 4, "depths": [2, 1, 2, 3], "channels": [64, 64, 128, 128],
    "self_attn_depths": [False, False, False, True], "cross_attn_depths": [False, True, True, True],
    "cross_cond_dim": 32, "has_variance": True, "dropout_rate": 0.0, "augment_prob": 0.0, "augment_wrapper": False,
    "sigma_data": 1.0, "sigma_min": 1e-2, "sigma_max": 20, "skip_stages": 0,
    "sigma_sample_density": {"type": "lognormal", "mean": -0.5, "std": 1.2},
}



def _kdiffusion_model(config):
    K = import_k_diffusion()
    return K.models.ImageDenoiserModelV1(
        config["input_channels"], config["mapping_out"], config["depths"], config["channels"],
        config["self_attn_depths"], config["cross_attn_depths"], mapping_cond_dim=config["mapping_cond_dim"],
        unet_cond_dim=config["unet_cond_dim"], cross_cond_dim=config["cross_cond_dim"],
        has_variance=config["has_variance"], patch_size=config["patch_size"], skip_stages=config["skip_stages"],
    )


class _Payload:  # a pickled object that is not a tensor
    pass


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A random tiny original model, its wrapper state dict, and the files the release would have."""
    folder = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    model = _kdiffusion_model(TINY).eval()
    # k-diffusion zero-initialises proj_out, the attention outputs and every AdaGN: a parity test on
    # those weights could not fail, so every parameter is redrawn
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_enc.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:  # unit gain; proj_out smaller, for outputs of about the size of latents
                gain = 0.2 if name.startswith("proj_out") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    state = {f"inner_model.{k}": v for k, v in model.state_dict().items()}
    state[NOISE_EMBED] = torch.randn(64, 1, generator=g) * 2  # FourierFeatures(1, 128, std=2)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({"model": TINY, "dataset": {"type": "imagefolder"}}))
    pth, safetensors = folder / "model.pth", folder / "model.safetensors"
    torch.save({"model_ema": state, "model": {"not": torch.zeros(1)}, "step": 470000}, pth)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, safetensors)
    return {"model": model, "state": state, "config": config_path, "pth": pth, "safetensors": safetensors}


def _inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    return {
        "input": x,
        "sigma": torch.tensor([0.3, 7.0]),
        "mapping_cond": torch.randn(2, 160, generator=g),
        "unet_cond": torch.randn(2, 4, 16, 16, generator=g),
        "cross_cond": torch.randn(2, 7, 32, generator=g),
        "cross_cond_padding": torch.tensor([[0.0] * 5 + [1.0] * 2, [0.0] * 7]),  # 1 = padded token
    }


def _ours(unet, a, mask=True):
    """Our UNet on k-diffusion's arguments: the concatenated input and c_noise = ln(sigma) / 4."""
    return unet(torch.cat([a["input"], a["unet_cond"]], dim=1), a["sigma"].log() / 4, a["cross_cond"],
                timestep_cond=a["mapping_cond"],
                encoder_attention_mask=(a["cross_cond_padding"] == 0) if mask else None)


@pytest.mark.parametrize("file", ["pth", "safetensors"])
def test_loaded_unet_equals_kdiffusion_model(original, file):
    unet, noise_embed = load_original_unet(original[file], original["config"])
    a = _inputs()
    with torch.no_grad():
        denoised, logvar = original["model"](**a, return_variance=True)
        ours = _ours(unet, a)
        unmasked = _ours(unet, a, mask=False)
    assert ours.shape == (2, 5, 16, 16)
    assert denoised.abs().max() > 0.1 and logvar.abs().max() > 0.01  # not a zero-initialised output
    assert max_diff(ours[:, :4], denoised) <= 1e-5
    assert max_diff(ours[:, 4].flatten(1).mean(1), logvar) <= 1e-5
    # the padding mask reached the attention: the padded sample changes without it, the other does not
    assert max_diff(unmasked[0], ours[0]) > 1e-3 and max_diff(unmasked[1], ours[1]) <= 1e-6
    assert torch.equal(noise_embed, original["state"][NOISE_EMBED])
    assert not unet.training


def test_loaded_unet_loads_in_diffusers_with_equal_output(original, tmp_path):
    unet, _ = load_original_unet(original["safetensors"], original["config"])
    save_model(unet, tmp_path)
    theirs = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    direct = UNet2DConditionModel.from_config(unet.config.to_dict())
    assert {k: v.shape for k, v in direct.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    a = _inputs(seed=3)
    with torch.no_grad():
        ours = _ours(unet, a)
        out = theirs(torch.cat([a["input"], a["unet_cond"]], dim=1), a["sigma"].log() / 4, a["cross_cond"],
                     timestep_cond=a["mapping_cond"], encoder_attention_mask=a["cross_cond_padding"] == 0).sample
    assert max_diff(out, ours) <= 1e-5


def test_read_checkpoint_prefers_model_ema_and_refuses_pickled_objects(original, tmp_path):
    state = read_checkpoint(original["pth"])
    assert state.keys() == original["state"].keys()
    assert all(torch.equal(state[k], original["state"][k]) for k in state)
    bad = tmp_path / "bad.pth"
    torch.save({"model_ema": original["state"], "payload": _Payload()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(bad)


def test_mismatched_checkpoint_names_original_keys(original, tmp_path):
    state = dict(original["state"])
    missing = "inner_model.u_net.d_blocks.1.1.main.2.weight"
    wrong = "inner_model.u_net.u_blocks.0.1.qkv_proj.weight"  # level 3, layer 0: resnet at 0, self-attention at 1
    kernel = "inner_model.u_net.u_blocks.0.9.kernel"  # after 3 × (resnet, self, cross)
    assert wrong in state and kernel in state
    del state[missing]
    state["inner_model.u_net.extra.weight"] = torch.zeros(3)
    state[wrong] = torch.zeros(5, 128, 1, 1)
    state[kernel] = state[kernel] * 2
    path = tmp_path / "broken.safetensors"
    from safetensors.torch import save_file

    save_file(state, path)
    with pytest.raises(WeightsMismatchError) as info:
        load_original_unet(path, original["config"])
    message = str(info.value)
    assert re.search(rf"missing: {re.escape(missing)}\n", message)
    assert re.search(r"unexpected: inner_model\.u_net\.extra\.weight\n", message)
    assert f"{wrong}: checkpoint (5, 128, 1, 1), config (384, 128, 1, 1)" in message
    assert re.search(rf"kernel.*: {re.escape(kernel)}$", message)


def test_checkpoint_without_wrapper_buffer_gives_none(original):
    config = OriginalModelConfig.from_json_file(original["config"])
    with no_weight_init():
        unet = KUNet(config.to_unet_config())
    state = {k: v for k, v in original["state"].items() if k != NOISE_EMBED}
    weights, noise_embed = convert_original_state_dict(state, config, unet)
    assert noise_embed is None and weights.keys() == unet.state_dict().keys()


def _changed(**changes):
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("field, changes", [
    ("type", {"type": "image_transformer_v1"}),
    ("foo", {"foo": 1}),
    ("depths", {"depths": ...}),
    ("depths", {"depths": [2, 2, 2]}),
    ("patch_size", {"patch_size": 2}),
    ("skip_stages", {"skip_stages": 1}),
    ("augment_wrapper", {"augment_wrapper": ...}),  # k-diffusion's default is true
    ("sigma_data", {"sigma_data": 0.5}),
    ("mapping_out", {"mapping_out": 256}),
    ("cross_cond_dim", {"cross_cond_dim": 0}),
    ("self_attn_depths", {"self_attn_depths": [False, False, True, True]}),
    ("self_attn_depths", {"self_attn_depths": [False] * 4}),
    ("cross_attn_depths", {"cross_attn_depths": [False, True, True, False]}),
    # the brief's first idea of a tiny model: 32-wide attention is one 32-channel head in the original
    ("channels", {"channels": [32, 32, 64, 64], "mapping_out": 64}),
    # level 2's up block has width 128 = next width = mapping_out: diffusers makes it a "first" block
    ("channels", {"channels": [64, 128, 128, 128]}),
    # level 1 is a KUpBlock2D, whose last resnet narrows in conv1 where the original narrows in conv2
    ("channels", {"channels": [64, 256, 128, 128], "cross_attn_depths": [False, False, True, True]}),
])
def test_unsupported_config_names_the_field(field, changes):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        OriginalModelConfig.from_dict(_changed(**changes), source="cfg.json")


def test_config_reads_whole_file_or_model_section():
    assert OriginalModelConfig.from_dict({"model": TINY, "optimizer": {}}) == OriginalModelConfig.from_dict(TINY)


def test_shipped_config_is_the_hub_unet():
    config = OriginalModelConfig.from_json_file(ORIGINAL_CONFIG)
    unet_config = config.to_unet_config()
    assert unet_config == UNetConfig.from_dict(HUB_UNET_CONFIG)

    hub = {k: v for k, v in HUB_UNET_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"), no_weight_init():
        ours = KUNet(unet_config)
        theirs = UNet2DConditionModel(**hub)
        kdiffusion = _kdiffusion_model(json.loads(pathlib.Path(ORIGINAL_CONFIG).read_text())["model"])
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == 372_560_645

    # the key table covers the real checkpoint exactly: §1.8's 566 tensors, shapes included
    layout = original_layout(config, ours).shapes
    release = {f"inner_model.{k}": tuple(v.shape) for k, v in kdiffusion.state_dict().items()}
    release[NOISE_EMBED] = (64, 1)
    assert layout == release and len(layout) == 566
