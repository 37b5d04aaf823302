"""The drop-in for diffusers' ``StableDiffusionLatentUpscalePipeline``.

An upscale, in the order of ``reference/diffusers-reference.md`` §1.2:
inputs → prompt embeddings → low-res latents (VAE-encoded if pixels) → σ schedule →
``sample_euler(guidance(denoiser(conditioning(unet))), noise · σ_max, sigmas)`` → VAE decode → crop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import images as imgs
from . import schedules
from .conditioning import UpscalerConditioning, augment_low_res, prepare_conditioning
from .denoiser import KarrasDenoiser
from .driver import NOTEBOOK_SIGMA_MAX, NOTEBOOK_SIGMA_MIN, StepHooks, check_options, get_sampler, run_sampler
from .guidance import ClassifierFreeGuidance, guidance_mode
from .memory import MemoryLike, plan_call
from .prompts import PromptType, TextStates, broadcast, encode_text, prompt_list
from .randomness import randn
from .switches import PipelineSwitches

@dataclasses.dataclass
class StableDiffusionPipelineOutput:
    """``images``: a list of PIL images, an NHWC float array, an NCHW tensor or latents.

    ``nsfw_content_detected`` is always None: this pipeline has no safety checker.
    Indexable like diffusers' outputs: ``out[0]`` and ``out["images"]`` are the images.
    """

    images: Any
    nsfw_content_detected: Optional[List[bool]] = None

    def __getitem__(self, key: Union[int, str]) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.images, self.nsfw_content_detected) if v is not None)


class StableDiffusionLatentUpscalePipeline(PipelineSwitches):
    """Doubles the resolution of Stable Diffusion images in latent space.

    Components (the names and classes of a hub folder): ``vae`` (our AutoencoderKL), ``text_encoder``
    (``transformers.CLIPTextModel``), ``tokenizer`` (``transformers.CLIPTokenizer``), ``unet`` (our
    K-UNet) and ``scheduler`` (our EulerDiscreteScheduler: the σ schedule). ``low_res_noise_embed``:
    the original checkpoint's noise-level frequencies, for ``noise_level`` > 0.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, low_res_noise_embed: Optional[torch.Tensor] = None):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        #: (64, 1) frequencies of the original model's noise-level embedding; only the original
        #: checkpoint has them, and only ``noise_level`` > 0 needs them
        self.low_res_noise_embed = low_res_noise_embed
        self._progress_bar_config: Dict[str, Any] = {}

    # ---- components, device, dtype ----

    @property
    def components(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, *args: Any, **kwargs: Any) -> "StableDiffusionLatentUpscalePipeline":
        """Move every model: ``to("cuda")``, ``to(torch.float16)``, ``to("cuda", torch.float16)``,
        or ``to(device=..., dtype=...)``."""
        self._refuse_while_offloaded("to()")
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unexpected arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                raise TypeError(f"to() takes a device and/or a torch dtype, got {arg!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point type; use torch.float32, float16 or bfloat16")
        for model in (self.text_encoder, self.unet, self.vae):
            model.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar over steps, e.g. ``disable=True`` or ``desc="upscaling"``."""
        self._progress_bar_config = kwargs

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any):
        """Load a hub-layout folder or a hub id (see ``latent_upscaler.loading.load_pipeline``)."""
        from .loading.pipeline import load_pipeline

        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: Union[str, os.PathLike], config=None, **kwargs: Any):
        """Load the original k-diffusion checkpoint and its JSON config (see
        ``latent_upscaler.loading.pipeline.load_single_file``); keeps the noise-level embedding."""
        from .loading.pipeline import load_single_file

        return load_single_file(cls, pretrained_model_link_or_path, config=config, **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True,
                        variant: Optional[str] = None) -> None:
        """Write the hub layout, which both this package and diffusers load."""
        from .loading.pipeline import save_pipeline

        self._refuse_while_offloaded("save_pretrained()")
        save_pipeline(self, save_directory, safe_serialization=safe_serialization, variant=variant)

    # ---- text ----

    def encode_prompt(
        self,
        prompt: PromptType,
        device: Optional[torch.device] = None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: PromptType = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
    ):
        """Returns ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds)``; the negative pair is None without guidance.

        Embeddings: CLIP's last hidden layer before its final layer norm (B, 77, C); pooled: the
        final layer-normed state at the end-of-text token (B, C). Given embeddings are returned as
        they are; missing negative ones are encoded from ``negative_prompt`` (or "") even when
        positive ones were given (diffusers crashes there).
        """
        device = self.device if device is None else torch.device(device)
        cond, uncond = self._text_states(prompt, negative_prompt, prompt_embeds, pooled_prompt_embeds,
                                         negative_prompt_embeds, negative_pooled_prompt_embeds, None,
                                         do_classifier_free_guidance, device, with_mask=False)
        if uncond is None:
            return cond.embeds, None, cond.pooled, None
        return cond.embeds, uncond.embeds, cond.pooled, uncond.pooled

    def _text_states(self, prompt, negative_prompt, embeds, pooled, neg_embeds, neg_pooled, batch_size,
                     need_uncond, device, with_mask):
        """CLIP states of the prompts and, when ``need_uncond``, of the negative prompts ("" by
        default), each broadcast to ``batch_size`` (the prompts' count when None)."""
        if embeds is not None:
            cond = TextStates(embeds.to(device), pooled.to(device))
        else:
            texts = prompt_list(prompt, "prompt")
            texts = broadcast(texts, batch_size or len(texts), "prompt")
            cond = encode_text(self.tokenizer, self.text_encoder, texts, device, with_mask)
        batch_size = batch_size or len(cond)
        cond = cond.repeat_to(batch_size)
        if not need_uncond:
            return cond, None
        if neg_embeds is not None:
            uncond = TextStates(neg_embeds.to(device), neg_pooled.to(device))
        else:
            negatives = broadcast(prompt_list(negative_prompt, "negative_prompt"), batch_size, "negative_prompt")
            uncond = encode_text(self.tokenizer, self.text_encoder, negatives, device, with_mask)
        return cond, uncond.repeat_to(batch_size)

    # ---- the call ----

    @torch.no_grad()
    def __call__(
        self,
        prompt: PromptType = None,
        image: Any = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt: PromptType = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
        callback_steps: int = 1,
        *,
        sampler: str = "euler",
        sigma_schedule: str = "log_linear",
        eta: Optional[float] = None,
        tol_scale: float = 0.25,
        noise_level: float = 0.0,
        noise_aug_type: str = "gaussian",
        faithful: bool = False,
        callback_on_step_end: Optional[Callable[..., Dict[str, torch.Tensor]]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_memory: MemoryLike = "auto",
        tile_size: Optional[int] = None,
        vae_tile_size: Optional[int] = None,
        tile_overlap: Optional[int] = None,
    ):
        """Upscale ``image`` ×2, guided by ``prompt``.

        Args:
            prompt: text (or one per image) that guides the upscale; "" when omitted.
            image: SD latents (4-channel tensor, scaled by the VAE's scaling_factor), pixels (3- or
                1-channel tensor in [0, 1] or [-1, 1], PIL image, numpy array), or a list of them.
                Any size: the output is exactly twice the input.
            num_inference_steps: sampler steps (for ``dpm_fast`` the number of model evaluations;
                ``dpm_adaptive`` chooses its own).
            guidance_scale: classifier-free guidance on the denoised latent; above 1 it guides, 0
                ignores the prompt, values in (0, 1] use the prompt without guidance (with
                ``faithful``: 1 uses the prompt alone, any other value but 0 guides).
            negative_prompt: what to steer away from (str for all, or one per prompt).
            generator: a ``torch.Generator`` or one per image (each image then gets the same result
                whatever the batch it is in); drives every random draw.
            latents: the initial noise (B, 4, 2h, 2w) at unit variance; drawn when None.
            prompt_embeds, pooled_prompt_embeds: precomputed CLIP states (B, 77, C) and (B, C),
                given together instead of ``prompt``; negative_* the same for the negative prompt.
            output_type: "pil", "np" (NHWC floats in [0, 1]), "pt" (NCHW floats in [0, 1]) or
                "latent" (SD latents of the upscaled image, scaled by the VAE's scaling_factor).
            return_dict: return a :class:`StableDiffusionPipelineOutput` rather than a tuple.
            callback: ``callback(step, timestep, latents)`` after every ``callback_steps`` steps
                (diffusers' legacy callback; ``timestep`` is the σ for non-default schedules).
            sampler: one of ``latent_upscaler.sampling.SAMPLERS``; "euler" is diffusers' sampler.
            sigma_schedule: "log_linear" (the model's own, from the scheduler config), "karras"
                or "exponential", between the scheduler's σ_min and σ_max.
            eta: ancestral noise of the stochastic samplers (their default when None).
            tol_scale: error tolerance of ``dpm_adaptive``: rtol = 0.05·tol_scale, atol = tol_scale/127.5.
            noise_level: σ of the noise augmentation of the low-res latents (the original notebook's
                ``noise_aug_level``); needs the original checkpoint's embedding when above 0.
            noise_aug_type: "gaussian" (add noise) or "fake" (only tell the model it is noisy).
            faithful: reproduce the original notebook: the CLIP padding mask in cross-attention, its
                guidance semantics, its log-linear schedule between its own σ_min and σ_max.
            callback_on_step_end: ``f(pipe, step, sigma, callback_kwargs) -> dict`` after every
                step; ``callback_kwargs`` holds ``callback_on_step_end_tensor_inputs``; a returned
                "latents" replaces the sampler's state.
            max_memory: the memory the call may use in all (weights included), in bytes or as "12GiB";
                "auto": what the process holds plus 90 % of the device's free memory; None: no limit
                and no tiles unless sizes are given. The UNet and VAE run in the
                largest tiles whose estimated peak fits (latent_upscaler.memory); a budget that even
                the smallest tiles exceed raises MemoryBudgetError before any work.
            tile_size: UNet tiles, in output pixels (a multiple of 64): overrides the budget's choice.
            vae_tile_size: VAE tiles, in output pixels (a multiple of 8): overrides the budget's choice.
            tile_overlap: pixels shared by neighbouring tiles (default: a quarter of a UNet tile,
                64 pixels for VAE tiles).

        Returns:
            :class:`StableDiffusionPipelineOutput` or ``(images,)``.
        """
        output_type = imgs.check_output_type(output_type)
        _check_call(prompt, image, num_inference_steps, negative_prompt, negative_prompt_embeds,
                    prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, callback_steps)
        sampler_fn = get_sampler(sampler)
        check_options(sampler_fn, sampler, sigma_schedule, eta, tol_scale, noise_level, noise_aug_type,
                      callback_on_step_end_tensor_inputs)
        device = self.device
        prepared = imgs.prepare_image(image)
        n_prompts = prompt_embeds.shape[0] if prompt_embeds is not None else len(prompt_list(prompt, "prompt"))
        batch_size = _broadcast_batch(n_prompts, prepared.batch_size)
        mode = guidance_mode(guidance_scale, faithful)
        # the tiles the memory budget needs, or an error before any work
        plan = plan_call(self, prepared, batch_size, 2 if mode == "cfg" else 1, max_memory, tile_size,
                         vae_tile_size, tile_overlap)

        # 1. text: guidance 0 means unconditional (the prompt is replaced by "")
        if mode == "uncond":
            prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt = [""], None, None, None
        cond, uncond = self._text_states(prompt, negative_prompt, prompt_embeds, pooled_prompt_embeds,
                                         negative_prompt_embeds, negative_pooled_prompt_embeds, batch_size,
                                         mode == "cfg", device, with_mask=faithful)
        text = TextStates.cat(uncond, cond) if mode == "cfg" else cond  # unconditional half first
        dtype = text.embeds.dtype

        # 2. low-res latents: given, or a sample of the VAE posterior of the pixels; then augmented
        low_res = prepared.tensor.to(device=device, dtype=dtype)
        if low_res.shape[0] != batch_size:
            low_res = low_res.expand(batch_size, -1, -1, -1)
        if not prepared.is_latent:
            with plan.vae_tiling(self.vae):
                low_res = self.vae.encode(low_res).latent_dist.sample(generator) * self.vae.config.scaling_factor
        low_res = augment_low_res(low_res, noise_level, noise_aug_type, generator)

        # 3. conditioning, σ schedule and initial noise
        copies = 2 if mode == "cfg" else 1
        levels = torch.full((copies * batch_size,), float(noise_level), device=device)
        cond_args = prepare_conditioning(torch.cat([low_res] * copies), levels, text.pooled, self.low_res_noise_embed)
        cond_args["encoder_hidden_states"] = text.embeds
        if text.mask is not None:
            cond_args["encoder_attention_mask"] = text.mask
        sigmas, timesteps, init_sigma = self._sigmas(num_inference_steps, sigma_schedule, faithful)
        shape = (batch_size, self.vae.config.latent_channels, 2 * low_res.shape[2], 2 * low_res.shape[3])
        if latents is None:
            latents = randn(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = self._check_latents(latents, shape, prepared)
        # the sampler's arithmetic runs in float32 whatever the model dtype, as diffusers' scheduler does
        x = (latents.to(device=device, dtype=dtype) * init_sigma.to(device)).float()

        # 4. sample: sampler(guidance(denoiser(conditioning(unet))))
        conditioning = UpscalerConditioning(self.unet)
        model = KarrasDenoiser(conditioning)
        if mode == "cfg":
            model = ClassifierFreeGuidance(model, guidance_scale)
        model = plan.wrap(model)  # MultiDiffusion over latent tiles, when the plan has them
        hooks = StepHooks(self, self._progress_bar_config, sigmas, timesteps, callback, callback_steps,
                           callback_on_step_end, callback_on_step_end_tensor_inputs, cond_args)
        with hooks:
            x = run_sampler(sampler_fn, model, x, sigmas, cond_args, hooks, generator=generator, eta=eta,
                            tol_scale=tol_scale, steps=num_inference_steps,
                            sigma_range=(NOTEBOOK_SIGMA_MIN, NOTEBOOK_SIGMA_MAX) if faithful else None)
        conditioning.release()  # its per-upscale caches (text keys and values, packed weights), before decoding

        # 5. decode and crop to exactly twice the input
        x = imgs.crop_latents(x.to(dtype), prepared)
        if output_type == "latent":
            images = x
        else:
            with plan.vae_tiling(self.vae):
                pixels = self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images = imgs.postprocess(pixels, prepared, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StableDiffusionPipelineOutput(images=images)

    def _sigmas(self, steps: int, schedule: str, faithful: bool):
        """(σ list the sampler visits, diffusers' timesteps for the legacy callback, initial σ)."""
        if faithful:  # the notebook's constants and its float32 log-linear spacing
            sigmas = schedules.log_linear(steps, NOTEBOOK_SIGMA_MIN, NOTEBOOK_SIGMA_MAX)
            return sigmas, sigmas[:-1], torch.tensor(NOTEBOOK_SIGMA_MAX)
        if schedule == "log_linear":
            s = self.scheduler.schedule(steps)
            return s.sigmas[: steps + 1], s.timesteps, s.init_noise_sigma
        sigmas = schedules.SCHEDULES[schedule](steps, self.scheduler.sigma_min, self.scheduler.sigma_max)
        return sigmas, sigmas[:-1], sigmas[0]

    @staticmethod
    def _check_latents(latents: torch.Tensor, shape: tuple, prepared: imgs.PreparedImage) -> torch.Tensor:
        """User noise of the padded shape, or of exactly twice the input (then padded like the input)."""
        exact = (shape[0], shape[1], -(-2 * prepared.height // imgs.VAE_SCALE), -(-2 * prepared.width // imgs.VAE_SCALE))
        if tuple(latents.shape) == shape:
            return latents
        if tuple(latents.shape) == exact:
            return imgs.pad_bottom_right(latents, shape[2], shape[3])
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {exact} for this image batch")

    # ---- helpers of the seed example ----

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor):
        """SD latents (scaled) → NHWC float32 numpy pixels in [0, 1]."""
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def numpy_to_pil(images):
        """NHWC (or HWC) floats in [0, 1] → a list of PIL images."""
        return imgs.numpy_to_pil(images)


def _broadcast_batch(n_prompts: int, n_images: int) -> int:
    if n_prompts == n_images or n_images == 1 or n_prompts == 1:
        return max(n_prompts, n_images)
    raise ValueError(
        f"{n_prompts} prompts for {n_images} images; pass one prompt per image, or a single prompt for all"
    )


def _check_call(prompt, image, steps, negative_prompt, negative_prompt_embeds, prompt_embeds, pooled,
                negative_pooled, callback_steps) -> None:
    if image is None:
        raise ValueError("image is required: pass SD latents, pixels or a PIL image to upscale")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
    if (prompt_embeds is None) != (pooled is None):
        raise ValueError("prompt_embeds and pooled_prompt_embeds go together: the pooled one conditions the "
                         "time embedding; pass both (as encode_prompt returns them)")
    if (negative_prompt_embeds is None) != (negative_pooled is None):
        raise ValueError("negative_prompt_embeds and negative_pooled_prompt_embeds go together; pass both")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
