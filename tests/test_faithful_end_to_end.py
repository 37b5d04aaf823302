"""The original stack end to end: a random checkpoint in the original layout, made with k-diffusion's
own model class and the notebook's wrapper stack (reference original-and-users.md §1.4), loaded with
``from_single_file``; our ``faithful`` pipeline equals a k-diffusion sampling run of that stack for
three samplers, both noise-augmentation types and guidance 0, 0.5, 1 and 4."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, floats_tensor, max_diff
from kdiffusion_ref import import_k_diffusion
from test_original_checkpoint import TINY, _kdiffusion_model
from torch import nn

from latent_upscaler import StableDiffusionLatentUpscalePipeline
from latent_upscaler.driver import NOTEBOOK_SIGMA_MAX, NOTEBOOK_SIGMA_MIN

STEPS = 3
TOL = 1e-5  # relative to the largest output value (random weights give latents of about 30)


class NotebookUpscaler(nn.Module):
    """The notebook's ``NoiseLevelAndTextConditionedUpscaler`` (σ_data = 1), as §1.4 describes it:
    the low-res latent nearest-upsampled and scaled by its own c_in, the Fourier embedding of
    log1p(its noise level) concatenated with the pooled CLIP embedding, CLIP states and padding."""

    def __init__(self, inner_model, embed_dim=128):
        super().__init__()
        self.inner_model = inner_model
        self.low_res_noise_embed = import_k_diffusion().layers.FourierFeatures(1, embed_dim, std=2)

    def forward(self, x, sigma, low_res, low_res_sigma, c):
        states, padding, pooled = c
        c_in = (1 / (low_res_sigma**2 + 1) ** 0.5)[:, None, None, None]
        low_res_in = F.interpolate(low_res, scale_factor=2, mode="nearest") * c_in
        mapping_cond = torch.cat([self.low_res_noise_embed(low_res_sigma.log1p()[:, None]), pooled], dim=1)
        return self.inner_model(x, sigma, unet_cond=low_res_in, mapping_cond=mapping_cond, cross_cond=states,
                                cross_cond_padding=padding)


class NotebookCFG(nn.Module):
    """The notebook's ``CFGUpscaler``: 0 → unconditional pass, 1 → conditional pass, otherwise both."""

    def __init__(self, model, uc, scale):
        super().__init__()
        self.inner_model, self.uc, self.scale = model, uc, scale

    def forward(self, x, sigma, low_res, low_res_sigma, c):
        if self.scale in (0.0, 1.0):
            text = self.uc if self.scale == 0.0 else c
            return self.inner_model(x, sigma, low_res=low_res, low_res_sigma=low_res_sigma, c=text)
        two = lambda t: torch.cat([t, t])  # noqa: E731
        text = [torch.cat([u, v]) for u, v in zip(self.uc, c)]
        uncond, cond = self.inner_model(two(x), two(sigma), low_res=two(low_res), low_res_sigma=two(low_res_sigma),
                                        c=text).chunk(2)
        return uncond + (cond - uncond) * self.scale


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_pipe):
    K = import_k_diffusion()
    torch.manual_seed(0)
    inner = _kdiffusion_model(TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # k-diffusion zero-initialises outputs: redraw everything
        for name, p in inner.named_parameters():
            if p.ndim >= 2:
                gain = 0.2 if name.startswith("proj_out") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_((1.0 if "norm_enc.weight" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    wrapper = NotebookUpscaler(inner).eval()
    folder = tmp_path_factory.mktemp("notebook")
    torch.save({"model_ema": wrapper.state_dict()}, folder / "model.pth")
    (folder / "config.json").write_text(json.dumps({"model": TINY}))
    denoiser = K.layers.DenoiserWithVariance(wrapper, sigma_data=1.0).eval()
    pipe = StableDiffusionLatentUpscalePipeline.from_single_file(
        folder / "model.pth", config=folder / "config.json", vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder,
        tokenizer=tiny_pipe.tokenizer, scheduler=tiny_pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return K, denoiser, pipe


def _notebook_text(pipe, texts):
    """The notebook's CLIPEmbedder: last hidden state before the final norm, padding, pooled."""
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    out = pipe.text_encoder(tokens.input_ids, output_hidden_states=True)
    return out.hidden_states[-1], (1 - tokens.attention_mask).float(), out.pooler_output


def _notebook_run(K, denoiser, pipe, low_res, sampler, scale, level, kind, seed):
    """The notebook's run cell with its random draws taken from one seeded generator, in its order."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        noised = low_res + level * torch.randn(low_res.shape, generator=g)
    else:
        noised = low_res * (level**2 + 1) ** 0.5
    noise = torch.randn([1, 4, 2 * low_res.shape[2], 2 * low_res.shape[3]], generator=g)
    model = NotebookCFG(denoiser, _notebook_text(pipe, [""]), scale)
    extra = {"low_res": noised, "low_res_sigma": torch.full([1], level), "c": _notebook_text(pipe, [PROMPT])}
    noise_sampler = lambda sigma, sigma_next: torch.randn(noise.shape, generator=g)  # noqa: E731
    sigmas = torch.linspace(np.log(NOTEBOOK_SIGMA_MAX), np.log(NOTEBOOK_SIGMA_MIN), STEPS + 1).exp()
    x = noise * NOTEBOOK_SIGMA_MAX
    s = K.sampling
    with torch.no_grad():
        if sampler == "euler":
            return s.sample_euler(model, x, sigmas, extra_args=extra, disable=True)
        if sampler == "dpm_2_ancestral":
            return s.sample_dpm_2_ancestral(model, x, sigmas, extra_args=extra, eta=1.0, noise_sampler=noise_sampler,
                                            disable=True)
        return s.sample_dpm_fast(model, x, NOTEBOOK_SIGMA_MIN, NOTEBOOK_SIGMA_MAX, STEPS, extra_args=extra, eta=1.0,
                                 noise_sampler=noise_sampler, disable=True)


@pytest.mark.parametrize("sampler", ["euler", "dpm_2_ancestral", "dpm_fast"])
@pytest.mark.parametrize("kind", ["gaussian", "fake"])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 4.0])
def test_faithful_pipeline_equals_the_notebook_stack(original, sampler, kind, scale):
    K, denoiser, pipe = original
    low_res = floats_tensor((1, 4, 8, 8)) * 2 - 1
    expected = _notebook_run(K, denoiser, pipe, low_res, sampler, scale, 0.2, kind, seed=5)
    eta = None if sampler == "euler" else 1.0
    actual = pipe(prompt=PROMPT, image=low_res, num_inference_steps=STEPS, guidance_scale=scale, faithful=True,
                  sampler=sampler, eta=eta, noise_level=0.2, noise_aug_type=kind,
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert actual.shape == expected.shape
    assert max_diff(actual, expected) <= TOL * max(1.0, float(expected.abs().max()))


def test_the_stack_is_not_trivial(original):
    """The comparison can fail: noise level, type, mask and guidance each change the result."""
    K, denoiser, pipe = original
    low_res = floats_tensor((1, 4, 8, 8)) * 2 - 1
    base = _notebook_run(K, denoiser, pipe, low_res, "euler", 4.0, 0.2, "gaussian", seed=5)
    for changed in (_notebook_run(K, denoiser, pipe, low_res, "euler", 4.0, 0.4, "gaussian", seed=5),
                    _notebook_run(K, denoiser, pipe, low_res, "euler", 4.0, 0.2, "fake", seed=5),
                    _notebook_run(K, denoiser, pipe, low_res, "euler", 1.0, 0.2, "gaussian", seed=5)):
        assert max_diff(base, changed) > 1e-3
    unmasked = pipe(prompt=PROMPT, image=low_res, num_inference_steps=STEPS, guidance_scale=4.0, faithful=False,
                    noise_level=0.2, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert max_diff(base, unmasked) > 1e-3


def test_converted_folder_loads_in_diffusers_and_equals_our_default_pipeline(original, tmp_path):
    from diffusers import StableDiffusionLatentUpscalePipeline as Theirs

    _, _, pipe = original
    pipe.save_pretrained(tmp_path)
    theirs = Theirs.from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusionLatentUpscalePipeline.from_pretrained(tmp_path)
    assert torch.equal(ours.low_res_noise_embed, pipe.low_res_noise_embed)
    args = {"prompt": PROMPT, "image": floats_tensor((1, 4, 8, 8)), "num_inference_steps": 2, "output_type": "np"}
    expected = theirs(**args, generator=torch.Generator().manual_seed(0)).images
    actual = ours(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(expected, actual) <= 1e-5
