"""Prompts to CLIP states: the text side of the conditioning.

The x2 upscaler reads CLIP ViT-L/14's last hidden layer *before* its final layer norm (B, 77, 768)
through cross-attention, and the pooled output (the final layer-normed end-of-text state, (B, 768))
through its time embedding. The original model also masked the padding tokens in cross-attention;
diffusers does not (``faithful`` mode does).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional, Sequence, Union

import torch

PromptType = Union[str, Sequence[str], None]


@dataclasses.dataclass
class TextStates:
    """CLIP states of a batch of texts. ``mask``: (B, 77) bool, True on real tokens, or None."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def repeat_to(self, batch_size: int) -> "TextStates":
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise ValueError(f"{len(self)} prompt embeddings for a batch of {batch_size}")
        grow = lambda t: None if t is None else t.expand(batch_size, *t.shape[1:])  # noqa: E731
        return TextStates(grow(self.embeds), grow(self.pooled), grow(self.mask))

    @staticmethod
    def cat(first: "TextStates", second: "TextStates") -> "TextStates":
        mask = None
        if first.mask is not None or second.mask is not None:
            mask = torch.cat([_full_mask(first), _full_mask(second)])
        return TextStates(torch.cat([first.embeds, second.embeds]), torch.cat([first.pooled, second.pooled]), mask)


def _full_mask(states: TextStates) -> torch.Tensor:
    if states.mask is not None:
        return states.mask
    return torch.ones(states.embeds.shape[:2], dtype=torch.bool, device=states.embeds.device)


def prompt_list(prompt: PromptType, name: str) -> List[str]:
    """``prompt`` as a non-empty list of strings ("" when None); a clear error for anything else."""
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise ValueError(f"{name} is an empty list; pass a string or one string per image")
        return list(prompt)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def broadcast(texts: List[str], batch_size: int, name: str) -> List[str]:
    """One text per batch element: a single text is repeated, other lengths must match."""
    if len(texts) == batch_size:
        return texts
    if len(texts) == 1:
        return texts * batch_size
    raise ValueError(f"{name} has {len(texts)} entries for a batch of {batch_size}; pass one per image, "
                     "or a single string for all")


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: List[str], device: torch.device, with_mask: bool = False) -> TextStates:
    """CLIP states of ``texts``, padded/truncated to the tokenizer's 77 tokens, without an attention
    mask on the encoder (CLIP is causal, so padding after the end token changes nothing before it)."""
    max_length = tokenizer.model_max_length
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    untruncated = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > tokens.input_ids.shape[-1]:
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1 : -1])
        warnings.warn(f"CLIP reads at most {max_length} tokens; this part of the prompt was cut: {removed}")
    out = text_encoder(tokens.input_ids.to(device), output_hidden_states=True)
    mask = tokens.attention_mask.to(device=device, dtype=torch.bool) if with_mask else None
    return TextStates(out.hidden_states[-1], out.pooler_output, mask)
