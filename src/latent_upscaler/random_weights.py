"""The pipeline with random weights: smoke runs and benchmarks without downloading the model.

Its outputs are noise. The architecture is the hub model's (``stabilityai/sd-x2-latent-upscaler``:
our K-UNet and AutoencoderKL with their default configs, which are the hub's; CLIP ViT-L/14's text
encoder; the model's scheduler), or that of a local folder in the hub layout, whose config files are
read and whose weights are not. Weights are drawn from a seed, so two builds are identical.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

WARNING = ("WARNING: --random-weights: the model has RANDOM WEIGHTS; every output is NOISE. "
           "Use it for smoke runs and benchmarks only, never for real images.")

#: ``text_encoder/config.json`` of the hub folder: CLIP ViT-L/14's text tower
HUB_TEXT_ENCODER = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5,
}


def random_pipeline(architecture: Optional[Union[str, os.PathLike]] = None, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32):
    """A :class:`StableDiffusionLatentUpscalePipeline` with random weights drawn from ``seed``.

    ``architecture``: a hub-layout folder whose configs and tokenizer are used (its weights are not
    read); None for the hub model's architecture, with CLIP's real tokenizer when its vocabulary file
    is installed (``pip install --no-deps clip-anytorch``) and a byte-level one otherwise. Builds on
    the current default device, so ``with torch.device("meta"):`` builds it without memory.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models.unet import KUNet, UNetConfig
    from .models.vae import AutoencoderKL, VAEConfig
    from .pipeline import StableDiffusionLatentUpscalePipeline
    from .scheduler import EulerDiscreteScheduler

    if architecture is None:
        unet_config, vae_config = UNetConfig(), VAEConfig()
        text_config = CLIPTextConfig(**HUB_TEXT_ENCODER)
        scheduler = EulerDiscreteScheduler()
        tokenizer = _hub_tokenizer()
    else:
        folder = os.fspath(architecture)
        unet_config = UNetConfig.from_json_file(os.path.join(folder, "unet", "config.json"))
        vae_config = VAEConfig.from_json_file(os.path.join(folder, "vae", "config.json"))
        text_config = CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder"))
        scheduler = EulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = KUNet(unet_config)
        vae = AutoencoderKL(vae_config)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionLatentUpscalePipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                                unet=unet.eval(), scheduler=scheduler)
    return pipe.to(dtype) if dtype != torch.float32 else pipe


def _hub_tokenizer():
    from .clip_vocab import build_byte_level_tokenizer, build_clip_tokenizer

    try:
        return build_clip_tokenizer()
    except FileNotFoundError:
        return build_byte_level_tokenizer()
