"""Shared fixtures: diffusers' tiny test components (reference §5.1) with an offline CLIP tokenizer,
written to folders in the hub layout, and our pipeline loaded from them. All offline."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PROMPT = "A painting of a squirrel eating a burger"


def floats_tensor(shape, seed=0):
    """diffusers' ``floats_tensor(shape, rng=random.Random(seed))``: uniform [0, 1), row-major."""
    rng = random.Random(seed)
    n = 1
    for s in shape:
        n *= s
    return torch.tensor([rng.random() for _ in range(n)], dtype=torch.float32).view(shape)


def tiny_diffusers_components():
    """diffusers' ``get_dummy_components`` with the substitute tokenizer (914 tokens)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latent_upscaler.clip_vocab import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
    )
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="quick_gelu",
        projection_dim=512,
    )
    text_encoder = CLIPTextModel(text_config)
    return {
        "unet": unet.eval(), "vae": vae.eval(), "scheduler": EulerDiscreteScheduler(prediction_type="sample"),
        "text_encoder": text_encoder.eval(), "tokenizer": build_clip_tokenizer(n_merges=400),
    }


@pytest.fixture(scope="session")
def tiny_diffusers_pipe():
    from diffusers import StableDiffusionLatentUpscalePipeline as DiffusersPipeline

    pipe = DiffusersPipeline(**tiny_diffusers_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_folder(tiny_diffusers_pipe, tmp_path_factory):
    """The tiny pipeline as diffusers writes it (safetensors, hub layout)."""
    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_diffusers_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder):
    """Our pipeline loaded from diffusers' folder."""
    from latent_upscaler import StableDiffusionLatentUpscalePipeline

    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def max_diff(a, b) -> float:
    import numpy as np

    a = a.detach().cpu().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
    b = b.detach().cpu().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())
