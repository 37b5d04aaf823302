"""The drop-in for diffusers' ``StableDiffusionLatentUpscalePipeline``.

An upscale, in the order of ``reference/diffusers-reference.md`` §1.2:
inputs → prompt embeddings → low-res latents (VAE-encoded if pixels) → σ schedule →
``sample_euler(guidance(denoiser(conditioning(unet))), noise · σ_max, sigmas)`` → VAE decode → crop.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from . import images as imgs
from .conditioning import UpscalerConditioning, upsample_low_res, zero_noise_level_embedding
from .denoiser import KarrasDenoiser
from .guidance import ClassifierFreeGuidance, should_guide
from .randomness import randn
from .sampling import sample_euler

PromptType = Union[str, List[str], None]


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


class StableDiffusionLatentUpscalePipeline:
    """Doubles the resolution of Stable Diffusion images in latent space.

    Components (the names and classes of a hub folder): ``vae`` (our AutoencoderKL), ``text_encoder``
    (``transformers.CLIPTextModel``), ``tokenizer`` (``transformers.CLIPTokenizer``), ``unet`` (our
    K-UNet) and ``scheduler`` (our EulerDiscreteScheduler: the σ schedule).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar_config: Dict[str, Any] = {}

    # ---- components, device, dtype ----

    @property
    def components(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, *args: Any, **kwargs: Any) -> "StableDiffusionLatentUpscalePipeline":
        """Move every model: ``to("cuda")``, ``to(torch.float16)``, ``to("cuda", torch.float16)``,
        or ``to(device=..., dtype=...)``."""
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

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True,
                        variant: Optional[str] = None) -> None:
        """Write the hub layout, which both this package and diffusers load."""
        from .loading.pipeline import save_pipeline

        save_pipeline(self, save_directory, safe_serialization=safe_serialization, variant=variant)

    # ---- text ----

    @torch.no_grad()
    def _encode_text(self, texts: List[str], device: torch.device):
        """CLIP token states before the final layer norm (B, 77, C) and the pooled output (B, C)."""
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt").input_ids
        untruncated = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] > tokens.shape[-1]:
            removed = self.tokenizer.batch_decode(untruncated[:, max_length - 1 : -1])
            warnings.warn(f"CLIP reads at most {max_length} tokens; this part of the prompt was cut: {removed}")
        out = self.text_encoder(tokens.to(device), output_hidden_states=True)
        return out.hidden_states[-1], out.pooler_output

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

        Embeddings: CLIP's last hidden layer before its final layer norm (B, 77, C), pooled: the final
        layer-normed state at the end-of-text token (B, C). Given embeddings are returned as they are;
        missing negative ones are encoded from ``negative_prompt`` (or "") even when positive ones
        were given (diffusers crashes there).
        """
        device = self.device if device is None else torch.device(device)
        if prompt_embeds is None:
            prompts = _prompt_list(prompt, "prompt")
            prompt_embeds, pooled_prompt_embeds = self._encode_text(prompts, device)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negatives = [""] * batch_size
            else:
                negatives = _prompt_list(negative_prompt, "negative_prompt")
                if len(negatives) == 1:
                    negatives = negatives * batch_size
                elif len(negatives) != batch_size:
                    raise ValueError(
                        f"negative_prompt has {len(negatives)} entries but there are {batch_size} prompts; pass "
                        "one negative prompt per prompt, or a single string for all"
                    )
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_text(negatives, device)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

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
    ):
        """Upscale ``image`` ×2, guided by ``prompt``.

        Args:
            prompt: text (or one per image) that guides the upscale; "" when omitted.
            image: SD latents (4-channel tensor, scaled by the VAE's scaling_factor), pixels (3- or
                1-channel tensor in [0, 1] or [-1, 1], PIL image, numpy array), or a list of them.
                Any size: the output is exactly twice the input.
            num_inference_steps: Euler steps on the model's log-linear σ schedule.
            guidance_scale: classifier-free guidance on the denoised latent; above 1 it guides, 0
                ignores the prompt, values in (0, 1] use the prompt without guidance.
            negative_prompt: what to steer away from (str for all, or one per prompt).
            generator: a ``torch.Generator`` or one per image (each image then gets the same result
                whatever the batch it is in).
            latents: the initial noise (B, 4, 2h, 2w) at unit variance; drawn when None.
            prompt_embeds, pooled_prompt_embeds: precomputed CLIP states (B, 77, C) and (B, C),
                given together instead of ``prompt``; negative_* the same for the negative prompt.
            output_type: "pil", "np" (NHWC floats in [0, 1]), "pt" (NCHW floats in [0, 1]) or
                "latent" (SD latents of the upscaled image, scaled by the VAE's scaling_factor).
            return_dict: return a :class:`StableDiffusionPipelineOutput` rather than a tuple.
            callback: ``callback(step, timestep, latents)`` after every ``callback_steps`` steps.

        Returns:
            :class:`StableDiffusionPipelineOutput` or ``(images,)``.
        """
        output_type = imgs.check_output_type(output_type)
        _check_call(prompt, image, num_inference_steps, negative_prompt, negative_prompt_embeds,
                    prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, callback_steps)
        device = self.device
        prepared = imgs.prepare_image(image)

        # batch: one prompt per image; a single prompt or a single image is broadcast
        n_prompts = prompt_embeds.shape[0] if prompt_embeds is not None else len(_prompt_list(prompt, "prompt"))
        batch_size = _broadcast_batch(n_prompts, prepared.batch_size)
        if prompt_embeds is None:
            prompt = _prompt_list(prompt, "prompt")
            prompt = prompt * batch_size if len(prompt) == 1 else prompt
        elif prompt_embeds.shape[0] != batch_size:
            prompt_embeds = prompt_embeds.expand(batch_size, -1, -1)
            pooled_prompt_embeds = pooled_prompt_embeds.expand(batch_size, -1)

        # 1. prompt embeddings (guidance 0 means unconditional: the prompt is replaced by "")
        guide = should_guide(guidance_scale)
        if guidance_scale == 0:
            prompt, prompt_embeds, pooled_prompt_embeds = [""] * batch_size, None, None
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt, device, guide, negative_prompt, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds)
        if guide:
            embeds, pooled = torch.cat([_batch(neg_embeds, batch_size), embeds]), torch.cat(
                [_batch(neg_pooled, batch_size), pooled])
        dtype = embeds.dtype

        # 2. low-res latents: given, or a sample of the VAE posterior of the pixels
        low_res = prepared.tensor.to(device=device, dtype=dtype)
        if low_res.shape[0] != batch_size:
            low_res = low_res.expand(batch_size, -1, -1, -1)
        if not prepared.is_latent:
            posterior = self.vae.encode(low_res).latent_dist
            low_res = posterior.sample(generator) * self.vae.config.scaling_factor

        # 3. conditioning, σ schedule and initial noise
        multiplier = 2 if guide else 1
        low_res_cond = upsample_low_res(torch.cat([low_res] * multiplier)).to(dtype)
        timestep_cond = torch.cat([zero_noise_level_embedding(pooled.shape[0], pooled.dtype, device), pooled], dim=1)
        schedule = self.scheduler.schedule(num_inference_steps)
        sigmas = schedule.sigmas[: num_inference_steps + 1].to(device)
        shape = (batch_size, self.vae.config.latent_channels, 2 * low_res.shape[2], 2 * low_res.shape[3])
        if latents is None:
            latents = randn(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = self._check_latents(latents, shape, prepared)
        # the sampler's arithmetic runs in float32 whatever the model dtype, as diffusers' scheduler does
        x = (latents.to(device=device, dtype=dtype) * schedule.init_noise_sigma.to(device)).float()

        # 4. sample: sampler(guidance(denoiser(conditioning(unet))))
        model = KarrasDenoiser(UpscalerConditioning(self.unet))
        if guide:
            model = ClassifierFreeGuidance(model, guidance_scale)
        cond = {"low_res_cond": low_res_cond, "encoder_hidden_states": embeds, "timestep_cond": timestep_cond}
        x = self._sample(model, x, sigmas, cond, schedule.timesteps, callback, callback_steps)

        # 5. decode and crop to exactly twice the input
        x = imgs.crop_latents(x.to(dtype), prepared)
        if output_type == "latent":
            images = x
        else:
            pixels = self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images = imgs.postprocess(pixels, prepared, output_type)
        if not return_dict:
            return (images,)
        return StableDiffusionPipelineOutput(images=images)

    @staticmethod
    def _check_latents(latents: torch.Tensor, shape: tuple, prepared: imgs.PreparedImage) -> torch.Tensor:
        """User noise of the padded shape, or of exactly twice the input (then padded like the input)."""
        exact = (shape[0], shape[1], -(-2 * prepared.height // imgs.VAE_SCALE), -(-2 * prepared.width // imgs.VAE_SCALE))
        if tuple(latents.shape) == shape:
            return latents
        if tuple(latents.shape) == exact:
            return imgs.pad_bottom_right(latents, shape[2], shape[3])
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {exact} for this image batch")

    def _sample(self, model, x, sigmas, cond, timesteps, callback, callback_steps):
        """Euler over ``sigmas`` with a progress bar; the legacy callback sees each step's result."""
        from tqdm.auto import tqdm

        steps = len(sigmas) - 1
        bar = tqdm(total=steps, **self._progress_bar_config)

        def report(step: int, latents: torch.Tensor) -> None:
            if callback is not None and step % callback_steps == 0:
                callback(step, timesteps[step], latents)

        def on_step(info: Dict[str, Any]) -> None:
            # k-diffusion callbacks fire once a step's model evaluation is done, before its update:
            # x here is the previous step's result
            bar.update()
            if info["i"] > 0:
                report(info["i"] - 1, info["x"])

        with bar:
            x = sample_euler(model, x, sigmas, extra_args=cond, callback=on_step, disable=True)
            report(steps - 1, x)
        return x

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


def _prompt_list(prompt: PromptType, name: str) -> List[str]:
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise ValueError(f"{name} is an empty list; pass a string or one string per image")
        return list(prompt)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def _broadcast_batch(n_prompts: int, n_images: int) -> int:
    if n_prompts == n_images or n_images == 1 or n_prompts == 1:
        return max(n_prompts, n_images)
    raise ValueError(
        f"{n_prompts} prompts for {n_images} images; pass one prompt per image, or a single prompt for all"
    )


def _batch(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    return t if t.shape[0] == batch_size else t.expand(batch_size, *t.shape[1:])


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
