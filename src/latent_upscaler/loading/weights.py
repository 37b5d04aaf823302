"""Reading and writing one model's weight files in diffusers' naming.

No code runs from a checkpoint, ever: safetensors, or ``torch.load(weights_only=True)`` for ``.bin``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Type

import torch

from ..models.base import ModelBase, no_weight_init
from ..models.ops import return_freed_memory

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"


def _variant(name: str, variant: Optional[str]) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem}.{variant}{ext}" if variant else name


def find_weights(folder: str, variant: Optional[str] = None, use_safetensors: Optional[bool] = None) -> str:
    """The weight file (or shard index) of ``folder``: safetensors first, ``.bin`` unless forbidden."""
    candidates = []
    if use_safetensors is not False:
        candidates += [_variant(f"{WEIGHTS_NAME}.safetensors", variant),
                       _variant(f"{WEIGHTS_NAME}.safetensors.index.json", variant)]
    if use_safetensors is not True:
        candidates += [_variant(f"{WEIGHTS_NAME}.bin", variant), _variant(f"{WEIGHTS_NAME}.bin.index.json", variant)]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = sorted(f for f in os.listdir(folder) if f.startswith(WEIGHTS_NAME)) if os.path.isdir(folder) else []
    hint = f" It has: {', '.join(present)}." if present else ""
    if variant and present:
        hint += f" Leave out variant={variant!r} or pick one of those."
    if use_safetensors and any(p.endswith(".bin") for p in present):
        hint += " Pass use_safetensors=None to allow .bin files."
    raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(candidates)}.{hint}")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors``/``.bin`` file or of the shards an ``.index.json`` lists."""
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: Dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
        return state
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def write_state_dict(state: Dict[str, torch.Tensor], folder: str, safe: bool = True, variant: Optional[str] = None) -> str:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if safe:
        from safetensors.torch import save_file

        path = os.path.join(folder, _variant(f"{WEIGHTS_NAME}.safetensors", variant))
        save_file(state, path, metadata={"format": "pt"})
    else:
        path = os.path.join(folder, _variant(f"{WEIGHTS_NAME}.bin", variant))
        torch.save(state, path)
    return path


def load_model(cls: Type[ModelBase], folder: str, *, dtype: Optional[torch.dtype] = None,
               variant: Optional[str] = None, use_safetensors: Optional[bool] = None) -> ModelBase:
    """Build ``cls`` from ``folder/config.json`` and load its weights strictly, in ``dtype`` (float32 by default)."""
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    config = cls.config_class.from_json_file(config_path)
    with no_weight_init():
        model = cls(config)
    weights = find_weights(folder, variant, use_safetensors)
    model.load_weights(read_state_dict(weights), source=weights)
    model = model.to(dtype or torch.float32).eval()
    return_freed_memory()  # the file's tensors (and float32 copies) would otherwise stay in the heap
    return model


def save_model(model: ModelBase, folder: str, safe: bool = True, variant: Optional[str] = None) -> None:
    os.makedirs(folder, exist_ok=True)
    model.config.to_json_file(os.path.join(folder, CONFIG_NAME))
    write_state_dict(model.state_dict(), folder, safe=safe, variant=variant)
