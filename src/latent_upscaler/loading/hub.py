"""Turning a hub id or a local path into a local folder in the hub layout."""

from __future__ import annotations

import os
from typing import List, Optional

DEFAULT_MODEL = "stabilityai/sd-x2-latent-upscaler"

# config and tokenizer files; weights are chosen per format below
_SMALL_FILES = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*"]


class ModelNotAvailableError(OSError):
    """The model is neither a local folder nor downloadable right now."""


def _weight_patterns(variant: Optional[str], safetensors: bool) -> List[str]:
    ext = "safetensors" if safetensors else "bin"
    infix = f".{variant}" if variant else ""
    return [f"*/*{infix}.{ext}", f"*/*.{ext}.index{infix}.json", f"*/*{infix}.{ext}.index.json"]


def resolve_folder(name_or_path: str | os.PathLike, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                   local_files_only: bool = False, token: Optional[str] = None, variant: Optional[str] = None,
                   use_safetensors: Optional[bool] = None) -> str:
    """A local folder holding the pipeline: ``name_or_path`` itself, or a hub snapshot of it."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelNotAvailableError(
            f"{path!r} is not a folder with a model in the hub layout (model_index.json, unet/, vae/, "
            f"text_encoder/, tokenizer/, scheduler/) nor a hub id like {DEFAULT_MODEL!r}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    kwargs = dict(repo_id=path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    try:
        folder = snapshot_download(allow_patterns=_SMALL_FILES + _weight_patterns(variant, use_safetensors is not False),
                                   **kwargs)
        if use_safetensors is None and not _has_all_weights(folder):
            # older hub folders (diffusers 0.13 era) may hold only .bin weights
            folder = snapshot_download(allow_patterns=_SMALL_FILES + _weight_patterns(variant, False), **kwargs)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = "in the local cache" if local_files_only else "on the Hugging Face Hub (is there a network?)"
        raise ModelNotAvailableError(
            f"could not get {path!r} {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"Download the folder on a connected machine (`hf download {path} --local-dir sd-x2-latent-upscaler`), "
            "copy it here and pass its path instead of the hub id."
        ) from None
    return folder


def _has_all_weights(folder: str) -> bool:
    for sub in ("unet", "vae", "text_encoder"):
        d = os.path.join(folder, sub)
        if not os.path.isdir(d) or not any(f.endswith((".safetensors", ".bin", ".index.json")) for f in os.listdir(d)):
            return False
    return True
