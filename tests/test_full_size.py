"""The hub's full-size architecture (reference §2.2–2.5) with random weights: our pipeline equals
diffusers' on a small latent, 1 step, with the real 49,408-token CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import floats_tensor, generator, max_diff

from latent_upscaler.clip_vocab import build_clip_tokenizer

pytestmark = pytest.mark.slow

HUB_UNET = {
    "act_fn": "gelu", "attention_head_dim": 64, "block_out_channels": [384, 384, 768, 768],
    "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 1, "conv_out_kernel": 1,
    "cross_attention_dim": 768,
    "down_block_types": ["KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 8, "layers_per_block": 4, "mid_block_scale_factor": 1, "mid_block_type": None,
    "norm_eps": 1e-05, "norm_num_groups": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 5, "resnet_time_scale_shift": "scale_shift", "sample_size": None,
    "time_cond_proj_dim": 896, "time_embedding_type": "fourier", "timestep_post_act": "gelu",
    "up_block_types": ["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": False,
}
HUB_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
HUB_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "interpolation_type": "log_linear", "prediction_type": "original_sample", "trained_betas": None,
}


def test_real_tokenizer_ids():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of an astronaut").input_ids == [49406, 320, 1125, 539, 550, 18376, 49407]


@pytest.fixture(scope="module")
def pipelines():
    from diffusers import AutoencoderKL as TheirVAE
    from diffusers import EulerDiscreteScheduler as TheirScheduler
    from diffusers import StableDiffusionLatentUpscalePipeline as Theirs
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latent_upscaler import StableDiffusionLatentUpscalePipeline
    from latent_upscaler.models.unet import KUNet
    from latent_upscaler.models.vae import AutoencoderKL
    from latent_upscaler.scheduler import EulerDiscreteScheduler

    torch.manual_seed(0)
    their_unet = UNet2DConditionModel(**HUB_UNET).eval()
    their_vae = TheirVAE(**HUB_VAE).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=2,
        pad_token_id=1, projection_dim=768)).eval()
    tokenizer = build_clip_tokenizer()
    theirs = Theirs(vae=their_vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=their_unet,
                    scheduler=TheirScheduler(**HUB_SCHEDULER))
    unet = KUNet.from_config(dict(their_unet.config))
    unet.load_weights(their_unet.state_dict())
    vae = AutoencoderKL.from_config(dict(their_vae.config))
    vae.load_weights(their_vae.state_dict())
    ours = StableDiffusionLatentUpscalePipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                                                unet=unet.eval(), scheduler=EulerDiscreteScheduler(**HUB_SCHEDULER))
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.mark.parametrize("case", [
    {"image": floats_tensor((1, 4, 8, 8))},
    {"image": floats_tensor((1, 3, 64, 64), seed=1), "guidance_scale": 0, "output_type": "latent"},
], ids=["latents-guidance-9", "pixels-guidance-0"])
def test_full_size_pipeline_matches_diffusers(pipelines, case):
    theirs, ours = pipelines
    args = {"prompt": "a photo of an astronaut", "num_inference_steps": 1, "output_type": "np", **case}
    expected = theirs(**args, generator=generator(0)).images
    actual = ours(**args, generator=generator(0)).images
    assert max_diff(expected, actual) <= 1e-5
