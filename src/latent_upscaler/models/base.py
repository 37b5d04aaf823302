"""What every model of ours shares: a config, a dtype and device, strict weight loading."""

from __future__ import annotations

import contextlib
from typing import ClassVar, Dict, Iterator, Mapping, Type

import torch
from torch import nn

from ..configuration import ModelConfig


class WeightsMismatchError(ValueError):
    """A checkpoint whose keys or shapes differ from the model built from its config."""


class ModelBase(nn.Module):
    """Base of our UNet and VAE.

    Subclasses set :attr:`config_class` and build themselves from ``config`` alone. Their state-dict
    keys equal diffusers' so that hub folders load with ``strict=True``.
    """

    config_class: ClassVar[Type[ModelConfig]]

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config: ModelConfig | Mapping) -> "ModelBase":
        if not isinstance(config, ModelConfig):
            config = cls.config_class.from_dict(config)
        return cls(config)

    @classmethod
    def convert_state_dict(cls, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rename keys of older checkpoint layouts to ours; the default changes nothing."""
        return state_dict

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
        """Load ``state_dict`` strictly, converting dtypes to ours; explain any difference."""
        state_dict = self.convert_state_dict(dict(state_dict))
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong_shape = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
            for k in set(own) & set(state_dict)
            if tuple(state_dict[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or wrong_shape:
            lines = [f"{source} does not match {type(self).__name__} built from its config:"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
                if items:
                    shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                    lines.append(f"  {title}: {shown}")
            raise WeightsMismatchError("\n".join(lines))
        self.load_state_dict(state_dict, strict=True)


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Build modules without random initialisation (their weights are about to be loaded)."""
    classes = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
    saved = [(c, c.reset_parameters) for c in classes]
    try:
        for c in classes:
            c.reset_parameters = lambda self: None
        yield
    finally:
        for c, fn in saved:
            c.reset_parameters = fn
