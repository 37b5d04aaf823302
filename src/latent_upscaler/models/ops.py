"""Building blocks that compute exactly what torch's plain ones compute, with less memory traffic.

Our models must give diffusers' outputs bit for bit in float32, so nothing here changes an
arithmetic operation or its order; what changes is where results are written and how weights are
laid out in memory:

* :class:`Conv2d` keeps its weight in the layout its inputs arrive in (NCHW or channels-last), so
  torch does not convert the weight on every call; inside :func:`packed_convolutions` its
  channels-last calls also reuse oneDNN's reordered copy of the weight across calls.
* :func:`add_into` and :func:`activation_` write into temporaries nobody else reads, when that
  leaves the result, its layout included, as it would have been.

Which layers run channels-last is diffusers' own accident (an attention block hands on a
channels-last view, ``reference/diffusers-reference.md`` §3.2); the layout decides which oneDNN
kernel runs and so the rounding, hence it is reproduced, not chosen.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import sys
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: in-place versions of diffusers' activations (``get_activation`` names, lower-cased); the same values
ACTIVATIONS_INPLACE: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "gelu": torch.ops.aten.gelu_,  # exact (erf) GELU, as nn.GELU()
    "mish": lambda x: F.mish(x, inplace=True),
    "relu": torch.relu_,
}


def activation_(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name``, applied in place, for tensors nothing else reads."""
    return ACTIVATIONS_INPLACE[name.lower()]


def add_into(first: torch.Tensor, second: torch.Tensor, fresh: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``first + second``, written into ``fresh`` (one of the two, a temporary nobody else reads,
    ``first`` by default) when that gives the very tensor torch would allocate for the sum.

    torch lays a sum out like its first operand, and that layout, down to the strides of size-1
    dimensions, decides how later layers run; so ``fresh`` is reused only when both operands have
    the same dense NCHW or channels-last strides. Otherwise the sum is a new tensor, as without this.
    """
    fresh = first if fresh is None else fresh
    if first.shape == second.shape and first.stride() == second.stride() and _dense_strides(fresh):
        return fresh.add_(second if fresh is first else first)
    return first + second


def _dense_strides(t: torch.Tensor) -> bool:
    if t.ndim != 4:
        return False
    _, c, h, w = t.shape
    return t.stride() in ((c * h * w, h * w, w, 1), (h * w * c, 1, w * c, c))


def runs_channels_last(x: torch.Tensor) -> bool:
    """Whether torch convolves ``x`` channels-last: c10's ``suggest_memory_format`` for 4-D strides
    (``is_channels_last_strides_2d_s4``), where ambiguous cases count as NCHW."""
    if x.ndim != 4 or x.stride(1) == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if x.shape[d] == 0 or x.stride(d) < smallest:
            return False
        if d == 0 and smallest == x.stride(1):
            return False
        smallest = x.stride(d) * (x.shape[d] if x.shape[d] > 1 else 1)
    return True


# ------------------------------------------------------------------------------------------------
# Convolutions


_PACKED: contextvars.ContextVar[Optional[Dict[Tuple[nn.Module, Tuple[int, ...]], torch.Tensor]]] = (
    contextvars.ContextVar("packed_convolutions", default=None))


@contextlib.contextmanager
def packed_convolutions(cache: Dict) -> Iterator[Dict]:
    """Within this context, each channels-last :class:`Conv2d` call on the CPU reorders its weight into
    oneDNN's blocked layout once per input shape and keeps it in ``cache``, instead of reordering it
    on every call. The same oneDNN kernel runs, so outputs are bitwise the same; for small images, where
    the reorder costs as much as the convolution, a network evaluated many times (every step of an
    upscale) runs up to twice as fast in those layers. The copies take as much memory as the weights
    they pack: drop ``cache`` when the evaluations are done."""
    token = _PACKED.set(cache)
    try:
        yield cache
    finally:
        _PACKED.reset(token)


def return_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the process's heap, so a
    gigabyte of packed weights, freed, would still count in the resident set through the decode.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _mkldnn_packing() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_reorder_convolution_weight"))


_CAN_PACK = _mkldnn_packing()
_BF16_ONEDNN = _CAN_PACK and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that stores its weight in the memory layout its inputs come in, and uses packed
    weights inside :func:`packed_convolutions`.

    A convolution whose weight is in the other layout than its input converts the weight on every
    call; this one converts it once, at its first call, and keeps it (the values, the state dict and
    the outputs stay the same).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = runs_channels_last(x)
        if runs_channels_last(self.weight) != channels_last:  # torch would use the weight's layout too
            layout = torch.channels_last if channels_last else torch.contiguous_format
            with torch.no_grad():
                self.weight.data = self.weight.data.clone(memory_format=layout)
        cache = _PACKED.get()
        if cache is not None and channels_last and self._packable(x):
            key = (self, tuple(x.shape))
            packed = cache.get(key)
            if packed is None:
                packed = cache[key] = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            return torch.ops.mkldnn._convolution_pointwise(
                x.contiguous(memory_format=torch.channels_last), packed, self.bias, list(self.padding),
                list(self.stride), list(self.dilation), self.groups, "none", [], "")
        return super().forward(x)

    def _packable(self, x: torch.Tensor) -> bool:
        return (_CAN_PACK and x.device.type == "cpu" and x.dtype == self.weight.dtype
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and self._torch_runs_onednn(x))

    def _torch_runs_onednn(self, x: torch.Tensor) -> bool:
        # ATen's ConvParams::use_mkldnn: elsewhere torch runs its own kernel, which rounds differently
        if x.dtype == torch.bfloat16:
            return _BF16_ONEDNN
        if x.dtype != torch.float32:
            return False
        n, (kh, kw) = x.shape[0], self.kernel_size
        return ((tuple(self.stride) != (1, 1) or tuple(self.dilation) != (1, 1) or n >= 16 or (kh, kw) != (1, 1)
                 or torch.get_num_threads() > 1)
                and (self.groups > 1 or (kh > 3 and kw > 3) or n > 1 or x.numel() > 20480))
