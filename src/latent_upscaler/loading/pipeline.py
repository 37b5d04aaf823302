"""A whole pipeline from and to a folder in the hub layout, as diffusers writes it.

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/{config.json, model.safetensors | pytorch_model.bin}
    tokenizer/{tokenizer_config.json, vocab.json + merges.txt | tokenizer.json, ...}
    unet/{config.json, diffusion_pytorch_model[.variant].safetensors | .bin}
    vae/{config.json, diffusion_pytorch_model[.variant].safetensors | .bin}
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from ..configuration import DIFFUSERS_FORMAT
from ..models.unet import KUNet
from ..models.vae import AutoencoderKL
from ..scheduler import EulerDiscreteScheduler
from .hub import resolve_folder
from .weights import load_model, save_model

PIPELINE_CLASS = "StableDiffusionLatentUpscalePipeline"
#: the original model's noise-level embedding, beside the UNet weights (diffusers ignores the file)
NOISE_EMBED_FILE = "low_res_noise_embed.safetensors"
MODEL_INDEX = {
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def load_pipeline(cls, pretrained_model_name_or_path, *, torch_dtype: Optional[torch.dtype] = None,
                  dtype: Optional[torch.dtype] = None, variant: Optional[str] = None, revision: Optional[str] = None,
                  cache_dir: Optional[str] = None, local_files_only: bool = False,
                  use_safetensors: Optional[bool] = None, token: Optional[str] = None, **components: Any):
    """Load the five components; any of them may be passed ready-made by name (``vae=my_vae``).

    ``dtype`` (or its older name ``torch_dtype``) sets the models' dtype, float32 by default.
    ``variant`` picks ``*.{variant}.safetensors`` files (e.g. "fp16"). Safetensors are preferred;
    ``.bin`` files load with ``torch.load(weights_only=True)`` unless ``use_safetensors=True``.
    """
    unknown = set(components) - set(MODEL_INDEX) - {"low_res_noise_embed"}
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected arguments {sorted(unknown)}")
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError("pass dtype or torch_dtype (its older name), not both")
    dtype = dtype or torch_dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a torch floating-point dtype such as torch.float16, got {dtype!r}")
    folder = resolve_folder(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                            local_files_only=local_files_only, token=token, variant=variant,
                            use_safetensors=use_safetensors)
    _check_model_index(folder)

    def sub(name: str) -> str:
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{folder} has no {name}/ folder; a hub-layout folder needs {', '.join(MODEL_INDEX)}")
        return path

    if "scheduler" not in components:
        components["scheduler"] = EulerDiscreteScheduler.from_pretrained(sub("scheduler"))
    for name, model_cls in (("unet", KUNet), ("vae", AutoencoderKL)):
        if name not in components:
            components[name] = load_model(model_cls, sub(name), dtype=dtype, variant=variant,
                                          use_safetensors=use_safetensors)
    if "text_encoder" not in components:
        components["text_encoder"] = _load_text_encoder(sub("text_encoder"), dtype, variant, use_safetensors)
    if "tokenizer" not in components:
        from transformers import CLIPTokenizer

        components["tokenizer"] = CLIPTokenizer.from_pretrained(sub("tokenizer"))
    if "low_res_noise_embed" not in components:
        components["low_res_noise_embed"] = read_noise_embedding(sub("unet"))
    return cls(**components)


def read_noise_embedding(unet_folder: str) -> Optional[torch.Tensor]:
    """The original checkpoint's (64, 1) noise-level frequencies, kept beside the UNet by our
    conversion in a file diffusers ignores; None for folders without it (e.g. the hub's)."""
    path = os.path.join(unet_folder, NOISE_EMBED_FILE)
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    weight = load_file(path).get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[1] != 1:
        raise ValueError(f"{path} should hold one tensor 'weight' of shape (64, 1): the original "
                         "checkpoint's low_res_noise_embed.weight")
    return weight.float()


def load_single_file(cls, checkpoint, *, config=None, components_from=None, torch_dtype=None, dtype=None,
                     **kwargs: Any):
    """The pipeline around the ORIGINAL k-diffusion checkpoint (``model_ema`` in a ``.pth``/``.ckpt``
    or ``.safetensors``) and its JSON config (the real model's when None).

    The checkpoint holds only the UNet and the noise-level embedding; the VAE, CLIP, tokenizer and
    scheduler come from the hub-layout folder or hub id ``components_from`` (by default the hub's
    sd-x2-latent-upscaler), unless they are passed by name.
    """
    from .hub import DEFAULT_MODEL
    from .original import load_original_unet

    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError("pass dtype or torch_dtype (its older name), not both")
    dtype = dtype or torch_dtype
    unet, noise_embed = load_original_unet(checkpoint, config, dtype=dtype or torch.float32)
    components = {k: kwargs.pop(k) for k in list(kwargs) if k in MODEL_INDEX}
    components["unet"] = unet
    components["low_res_noise_embed"] = None if noise_embed is None else noise_embed.float()
    if all(name in components for name in MODEL_INDEX):
        if kwargs:
            raise TypeError(f"from_single_file() got unexpected arguments {sorted(kwargs)}")
        return cls(**components)
    return load_pipeline(cls, components_from or DEFAULT_MODEL, dtype=dtype, **components, **kwargs)


def _check_model_index(folder: str) -> None:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no model_index.json; is it a diffusers pipeline folder?")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        raise ValueError(f"{path} describes a {name}, not a {PIPELINE_CLASS}; point to the SD x2 latent "
                         "upscaler's folder (stabilityai/sd-x2-latent-upscaler)")


def _load_text_encoder(folder: str, dtype: Optional[torch.dtype], variant: Optional[str],
                       use_safetensors: Optional[bool]):
    import transformers
    from transformers import CLIPTextModel

    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_arg: dtype or torch.float32, "variant": variant, "use_safetensors": use_safetensors}
    return CLIPTextModel.from_pretrained(folder, **kwargs).eval()


def save_pipeline(pipe, save_directory, *, safe_serialization: bool = True, variant: Optional[str] = None) -> None:
    os.makedirs(save_directory, exist_ok=True)
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_FORMAT, **MODEL_INDEX}
    with open(os.path.join(save_directory, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    pipe.scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))
    save_model(pipe.unet, os.path.join(save_directory, "unet"), safe=safe_serialization, variant=variant)
    save_model(pipe.vae, os.path.join(save_directory, "vae"), safe=safe_serialization, variant=variant)
    pipe.text_encoder.save_pretrained(os.path.join(save_directory, "text_encoder"),
                                      safe_serialization=safe_serialization, variant=variant)
    pipe.tokenizer.save_pretrained(os.path.join(save_directory, "tokenizer"))
    if pipe.low_res_noise_embed is not None:
        from safetensors.torch import save_file

        save_file({"weight": pipe.low_res_noise_embed.detach().float().contiguous().cpu()},
                  os.path.join(save_directory, "unet", NOISE_EMBED_FILE))
