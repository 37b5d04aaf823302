"""Gaussian noise drawn exactly as diffusers' ``randn_tensor`` draws it, so that seeds carry over.

Used for the pipeline's initial noise and for sampling the VAE posterior.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device`` (CPU when ``None``) in ``dtype``.

    Contract, identical to ``diffusers.utils.torch_utils.randn_tensor`` for the same seeds:

    - ``generator=None``: drawn from torch's global RNG, on ``device``.
    - one generator: the whole tensor is drawn from it in a single call. A CPU generator draws on
      the CPU and the result is moved to ``device`` (so a CPU seed gives the same noise whatever the
      accelerator); a generator on ``device`` draws there.
    - a list of generators: one per batch element (``shape[0]``); element ``i`` is a
      ``(1, *shape[1:])`` draw from ``generator[i]``, so an image's noise does not depend on the
      batch it is in. A list of length 1 acts as that single generator, for any batch size.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        generators = list(generator)
        if len(generators) == 1:
            generator = generators[0]
        elif len(generators) != shape[0]:
            raise ValueError(
                f"got a list of {len(generators)} generators for a batch of {shape[0]}; "
                "pass one generator per batch element, or a single generator for the whole batch"
            )
    draw_device = _draw_device(generator, device)
    if isinstance(generator, (list, tuple)):
        noise = torch.cat(
            [torch.randn((1,) + shape[1:], generator=g, device=draw_device, dtype=dtype) for g in generator]
        )
    else:
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device)


def _draw_device(generator: Generators, device: torch.device) -> torch.device:
    """Where to draw: on the CPU for CPU generators, else on ``device`` (which the generator must match)."""
    if generator is None:
        return device
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    if first.device.type == device.type:
        return device
    if first.device.type == "cpu":
        return torch.device("cpu")
    raise ValueError(
        f"cannot draw noise for {device} from a generator on {first.device}; "
        f"create it with torch.Generator(device={device.type!r}) or on the CPU"
    )
