"""The original notebook's features on top of the drop-in pipeline: noise augmentation, faithful
mode (padding mask, guidance semantics, schedule), step-end callbacks, sampler options."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, floats_tensor, generator, max_diff

from latent_upscaler import StableDiffusionLatentUpscalePipeline
from latent_upscaler.conditioning import MissingNoiseEmbeddingError
from latent_upscaler.guidance import guidance_mode


def _run(pipe, **kw):
    args = {"prompt": PROMPT, "image": floats_tensor((1, 4, 8, 8)), "num_inference_steps": 2,
            "generator": generator(0), "output_type": "latent"}
    args.update(kw)
    return pipe(**args).images


@pytest.fixture(scope="module")
def noisy_pipe(tiny_pipe):
    """The tiny pipeline with a noise-level embedding, as the original checkpoint has."""
    weight = torch.randn((64, 1), generator=generator(5)) * 2
    pipe = StableDiffusionLatentUpscalePipeline(**tiny_pipe.components, low_res_noise_embed=weight)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guidance_modes():
    assert [guidance_mode(g) for g in (0, 0.5, 1, 1.01, 9)] == ["uncond", "cond", "cond", "cfg", "cfg"]
    assert [guidance_mode(g, faithful=True) for g in (0, 0.5, 1, 4)] == ["uncond", "cfg", "cond", "cfg"]


def test_noise_level_needs_the_original_embedding(tiny_pipe):
    with pytest.raises(MissingNoiseEmbeddingError, match="from_single_file"):
        _run(tiny_pipe, noise_level=0.1)
    # level 0 works without it and equals diffusers' hard-coded embedding
    assert torch.equal(_run(tiny_pipe, noise_level=0.0), _run(tiny_pipe))


def test_level_zero_with_an_embedding_changes_nothing(tiny_pipe, noisy_pipe):
    assert torch.equal(_run(noisy_pipe, noise_level=0.0), _run(tiny_pipe))


@pytest.mark.parametrize("kind", ["gaussian", "fake"])
def test_noise_augmentation_changes_the_result(tiny_pipe, noisy_pipe, kind):
    plain = _run(tiny_pipe)
    augmented = _run(noisy_pipe, noise_level=0.3, noise_aug_type=kind)
    assert max_diff(plain, augmented) > 1e-3
    assert torch.equal(augmented, _run(noisy_pipe, noise_level=0.3, noise_aug_type=kind))  # reproducible


def test_augmentation_arithmetic():
    from latent_upscaler.conditioning import augment_low_res

    low_res = floats_tensor((2, 4, 3, 5))
    g = generator(4)
    fake = augment_low_res(low_res, 0.3, "fake", g)
    assert torch.allclose(fake, low_res * (1 + 0.3**2) ** 0.5)
    assert torch.equal(g.get_state(), generator(4).get_state())  # "fake" draws nothing
    gauss = augment_low_res(low_res, 0.3, "gaussian", generator(4))
    assert torch.allclose(gauss, low_res + 0.3 * torch.randn(low_res.shape, generator=generator(4)))
    assert augment_low_res(low_res, 0.0, "gaussian", g) is low_res


def test_noise_embedding_round_trips_through_a_folder(noisy_pipe, tmp_path):
    noisy_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "low_res_noise_embed.safetensors").is_file()
    again = StableDiffusionLatentUpscalePipeline.from_pretrained(tmp_path)
    assert torch.equal(again.low_res_noise_embed, noisy_pipe.low_res_noise_embed)
    from diffusers import StableDiffusionLatentUpscalePipeline as Theirs

    Theirs.from_pretrained(tmp_path)  # diffusers ignores the extra file


def test_faithful_mode_masks_padding_and_differs(tiny_pipe):
    plain, faithful = _run(tiny_pipe), _run(tiny_pipe, faithful=True)
    assert max_diff(plain, faithful) > 1e-4
    assert torch.equal(faithful, _run(tiny_pipe, faithful=True))


def test_faithful_guidance_between_0_and_1_interpolates(tiny_pipe):
    uncond = _run(tiny_pipe, faithful=True, guidance_scale=0)
    cond = _run(tiny_pipe, faithful=True, guidance_scale=1)
    half = _run(tiny_pipe, faithful=True, guidance_scale=0.5, num_inference_steps=1)
    assert max_diff(uncond, cond) > 1e-4
    # one step: the denoised estimate is the mix, so the result lies between the two one-step results
    u1 = _run(tiny_pipe, faithful=True, guidance_scale=0, num_inference_steps=1)
    c1 = _run(tiny_pipe, faithful=True, guidance_scale=1, num_inference_steps=1)
    assert max_diff(half, (u1 + c1) / 2) <= 1e-4
    # diffusers' semantics: 0.5 is conditional only
    assert torch.equal(_run(tiny_pipe, guidance_scale=0.5), _run(tiny_pipe, guidance_scale=1))


def test_callback_on_step_end_sees_and_replaces_latents(tiny_pipe):
    calls = []

    def on_step_end(pipe, step, sigma, kwargs):
        calls.append((step, float(sigma), sorted(kwargs)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 0 else {}

    out = _run(tiny_pipe, num_inference_steps=3, callback_on_step_end=on_step_end,
               callback_on_step_end_tensor_inputs=["latents", "denoised"])
    assert [c[0] for c in calls] == [0, 1, 2] and calls[0][2] == ["denoised", "latents"]
    assert calls[0][1] > calls[1][1] > calls[2][1]
    assert max_diff(out, _run(tiny_pipe, num_inference_steps=3)) > 1e-3
    with pytest.raises(ValueError, match="tensor_inputs"):
        _run(tiny_pipe, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["noise_pred"])


@pytest.mark.parametrize("kw,match", [
    ({"sampler": "k_lms_typo"}, "sampler"),
    ({"sigma_schedule": "cosine"}, "sigma_schedule"),
    ({"sampler": "euler", "eta": 0.5}, "takes no eta"),
    ({"noise_level": -1.0}, "noise_level"),
    ({"noise_aug_type": "uniform"}, "noise_aug_type"),
    ({"tol_scale": 0}, "tol_scale"),
])
def test_bad_sampler_options(tiny_pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        _run(tiny_pipe, **kw)
