"""The hub's full-size architecture (reference §2.2–2.5) with random weights: our pipeline equals
diffusers' on a small latent, 1 step, with the real 49,408-token CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import floats_tensor, generator, max_diff
from hub_configs import HUB_SCHEDULER, HUB_TEXT_ENCODER, HUB_UNET, HUB_VAE

from latent_upscaler.clip_vocab import build_clip_tokenizer

pytestmark = pytest.mark.slow

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
    their_unet = UNet2DConditionModel.from_config(HUB_UNET).eval()
    their_vae = TheirVAE.from_config(HUB_VAE).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**HUB_TEXT_ENCODER)).eval()
    tokenizer = build_clip_tokenizer()
    theirs = Theirs(vae=their_vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=their_unet,
                    scheduler=TheirScheduler.from_config(HUB_SCHEDULER))
    unet = KUNet.from_config(dict(their_unet.config))
    unet.load_weights(their_unet.state_dict())
    vae = AutoencoderKL.from_config(dict(their_vae.config))
    vae.load_weights(their_vae.state_dict())
    ours = StableDiffusionLatentUpscalePipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                                                unet=unet.eval(), scheduler=EulerDiscreteScheduler.from_config(HUB_SCHEDULER))
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
